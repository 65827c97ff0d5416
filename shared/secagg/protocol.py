"""Record names and stage constants shared by the server workflow and the client mod.

Kept in one place so both sides agree on the wire format without importing each other.
"""

from __future__ import annotations

RECORD = "secagg"
"""ConfigRecord name carrying the protocol payloads in both directions."""

STATE_RECORD = "secagg-state"
"""ConfigRecord in ``context.state`` holding the client's secrets for the current round only."""

PROTOCOL_ID = b"fedlora-secagg-v1"


class Stage:
    """Protocol stages, in order; each is one server -> clients -> server round trip."""

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    COLLECT = "collect-masked"
    UNMASK = "unmask"


class Key:
    """Keys inside the ``secagg`` ConfigRecord."""

    STAGE = "stage"
    SID = "sid"
    ROUND = "round"
    NODE_ID = "node-id"
    NEIGHBOURS = "neighbours"
    LOCAL_THRESHOLD = "local-threshold"
    GLOBAL_THRESHOLD = "threshold"
    PK_C = "pk-c"
    PK_S = "pk-s"
    IDS = "ids"
    DST = "dst"
    SRC = "src"
    CT = "ct"
    BITS = "bits"
    SCALE = "scale"
    MAX_WEIGHT = "max-weight"
    CLIP = "clip"
    MASKED = "masked"
    OVERFLOW = "overflow"
    OVERFLOW_REASON = "overflow-reason"
    REJECTED = "rejected"
    SURVIVORS = "survivors"
    DROPPED = "dropped"
    N_SURVIVORS = "n-survivors"
    SHARES = "shares"
