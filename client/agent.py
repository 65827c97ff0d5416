"""`fedlora client`: the agent a data owner runs next to their data (a Flower SuperNode).

The data path, column names, the owner's epsilon budget and the ledger path go into the
SuperNode's node config, which the ClientApp reads locally; none of it is sent to the
server. So does the owner's privacy policy (client/policy.py), which the ClientApp checks
every round's request against. Under DP only masked adapter updates, epsilon and delta
spent, bytes uploaded and a decline code leave the machine; details of a decline or a
failure go to `<home>/client.log`.

By default (`--isolation process`) the agent also runs one long-lived ClientApp process
(client/clientapp_process.py) next to the SuperNode, so imports and the model load happen
once per agent rather than once per message; `--isolation subprocess` is Flower's own
mode, a fresh ClientApp process per message.
"""

from __future__ import annotations

import hashlib
import os
import signal
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import tomli_w

from shared.flower_process import flower_bin, split_address, start_foreground, start_in_group
from shared.errors import FedLoraError

if TYPE_CHECKING:
    from client.policy import OwnerPolicy


def default_ledger(data: Path) -> Path:
    digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".fedlora" / "ledgers" / f"ledger-{digest}.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validate_data(path: Path, text_column: str = "text", label_column: str = "label",
                  profile_column: str = "profile", offer_column: str = "offer", prompt_column: str = "prompt",
                  response_column: str = "response", task: str | None = None, model: str | None = None) -> int:
    """Read the owner's file once, up front: a clear error now beats one mid-round.

    The task is the server's choice; `task` names it, else the file must fit one by its
    columns (the task modules' own input columns: text for classify, profile and offer
    for click, prompt for generate). The rows then go through the steps the ClientApp
    runs on them (`normalize`; for a generative task also its `encode` with `model`'s
    tokenizer, default the task's model), so missing columns, empty texts or responses
    and prompts longer than the model's context fail here, in one line."""
    from shared.config import FedConfig
    from shared.data import choose_max_length, encode, normalize, read_table
    from shared.tasks import TASKS, get_task

    df = read_table(str(path))
    columns = dict(text_column=text_column, label_column=label_column, profile_column=profile_column,
                   offer_column=offer_column, prompt_column=prompt_column, response_column=response_column)
    if task is None:
        fits = [name for name in TASKS if set(get_task(name).columns(FedConfig(**columns)).values()) <= set(df.columns)]
        if not fits:
            raise FedLoraError(f"{path} fits no task: it needs a {text_column!r} column (classify), {profile_column!r} "
                               f"and {offer_column!r} columns (click) or {prompt_column!r} and {response_column!r} "
                               f"columns (generate); columns: {', '.join(map(str, df.columns))}")
        task = fits[0]
    spec = get_task(task)
    cfg = FedConfig(task=task, model=model or spec.default_model, **columns)
    frame = normalize(df, cfg, str(path))
    if spec.generative:
        from shared.models import load_base_model

        base, tokenizer = load_base_model(cfg.model, 0, cfg.seed, task=spec)
        encode(frame, [], tokenizer, choose_max_length(frame, tokenizer, cfg, base), str(path), task=spec, model=base)
    elif frame["text"].str.strip().eq("").all():
        raise FedLoraError(f"{path}: column {spec.columns(cfg)['text']!r} has no text")
    return len(frame)


def check_node_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not path.is_file():
        raise FedLoraError(f"node key not found: {path}")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise FedLoraError(f"{path} is not an OpenSSH private key ({exc}); use the key `fedlora certs` made") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedLoraError(f"{path} must be an ECDSA (NIST curve) key for Flower's SuperNode authentication")


def run_agent(superlink: str, root_cert: Path | None, node_key: Path | None, data: Path,
              text_column: str = "text", label_column: str = "label", profile_column: str = "profile",
              offer_column: str = "offer", prompt_column: str = "prompt", response_column: str = "response",
              task: str | None = None, model: str | None = None, target_epsilon: float | None = None,
              ledger: Path | None = None, num_threads: int = 1, home: Path | None = None,
              insecure: bool = False, validate: bool = True, max_retries: int | None = None,
              policy: "OwnerPolicy | None" = None, roster: Path | None = None,
              secagg_min_fraction: float | None = None, isolation: str = "process",
              device: str = "auto") -> int:
    split_address(superlink)
    if isolation not in ISOLATION_MODES:
        raise FedLoraError(f"--isolation must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise FedLoraError(f"--device must be auto, cpu or cuda, got {device!r}")
    data = Path(data).expanduser().resolve()
    if not data.is_file():
        raise FedLoraError(f"data file not found: {data}")
    if not insecure:
        if root_cert is None or not Path(root_cert).expanduser().is_file():
            raise FedLoraError(f"--root-cert: CA certificate not found: {root_cert}")
    if node_key is not None:
        check_node_key(Path(node_key).expanduser())
    if target_epsilon is not None and not target_epsilon > 0:
        raise FedLoraError(f"--target-epsilon must be positive, got {target_epsilon}")
    from client.policy import OwnerPolicy

    policy = policy or OwnerPolicy()
    if validate:
        rows = validate_data(data, text_column, label_column, profile_column, offer_column, prompt_column,
                             response_column, task, model)
        print(f"fedlora client: {data.name}: {rows} examples", file=sys.stderr, flush=True)
    ledger = Path(ledger).expanduser().resolve() if ledger else default_ledger(data)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    home = Path(home).expanduser().resolve() if home else ledger.parent.parent / "agent" / ledger.stem.replace("ledger-", "")
    home.mkdir(parents=True, exist_ok=True)

    values: dict[str, object] = {"data-path": str(data), "text-column": text_column, "label-column": label_column,
                                 "profile-column": profile_column, "offer-column": offer_column,
                                 "prompt-column": prompt_column, "response-column": response_column,
                                 "ledger-path": str(ledger), "num-threads": int(num_threads), "device": device,
                                 "log-path": str(home / "client.log"), **policy.to_node_config()}
    if target_epsilon is not None:
        values["target-epsilon"] = float(target_epsilon)
    if task is not None:
        values["task"] = task  # enforced: rounds of any other task are declined (client/policy.py::check_task)
    if roster is not None:
        # Secure aggregation: this owner signs with its node key and trusts only the owner keys
        # in its local roster (from the operator, like ca.crt), never keys the server sends.
        from shared.secagg.identity import IdentityError, load_identity

        roster = Path(roster).expanduser().resolve()
        if node_key is None:
            raise FedLoraError("--roster needs --node-key (the key this owner signs with)")
        try:
            load_identity({"secagg-key": str(Path(node_key).expanduser().resolve()), "secagg-roster": str(roster)})
        except IdentityError as exc:
            raise FedLoraError(f"--roster: {exc}") from exc
        values["secagg-key"] = str(Path(node_key).expanduser().resolve())
        values["secagg-roster"] = str(roster)
    if secagg_min_fraction is not None:
        if not 0.0 <= secagg_min_fraction <= 1.0:
            raise FedLoraError("--secagg-min-fraction must be in [0, 1]")
        values["secagg-min-fraction"] = float(secagg_min_fraction)
    node_config = home / "node-config.toml"  # local only: read by this SuperNode, never uploaded
    node_config.write_text(tomli_w.dumps(values), encoding="utf-8")

    port = free_port()
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--node-config", str(node_config),
           "--port", str(port), "--isolation", isolation]
    if isolation == "process":
        # Only holders of this secret may claim the SuperNode's tasks (and with them the
        # node's messages and context): the agent's own ClientApp process.
        secret = home / "superexec.secret"
        secret.touch(mode=0o600)
        secret.chmod(0o600)
        secret.write_bytes(secrets.token_bytes(32))
        cmd += ["--superexec-auth-secret-file", str(secret)]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(root_cert).expanduser().resolve())]
    if node_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(node_key).expanduser().resolve())]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    print(f"fedlora client: joining {superlink}; ledger {ledger}; log {home / 'client.log'}", file=sys.stderr, flush=True)
    print(f"fedlora client: policy {policy}", file=sys.stderr, flush=True)
    proc = start_foreground(cmd, home)
    try:
        if isolation == "subprocess":
            return proc.wait()
        app_cmd = [sys.executable, "-m", "client.clientapp_process", "--runtime-api-address", f"127.0.0.1:{port}",
                   "--superexec-auth-secret-file", str(secret), "--ready-file", str(home / "clientapp.ready"),
                   "--log-path", str(home / "client.log")]
        return supervise(proc, lambda: start_in_group(app_cmd, home, proc), home / "clientapp.ready",
                         home / "client.log")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


ISOLATION_MODES = ("process", "subprocess")
RESTART_PAUSE = 1.0


def _note(log_path: Path, text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    try:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
    except OSError:
        pass


def supervise(node: subprocess.Popen, start_app, ready: Path, log_path: Path, poll: float = 0.5) -> int:
    """Wait for the SuperNode, keeping its ClientApp process alive; the SuperNode's exit
    status is the agent's.

    A ClientApp process that dies after it began serving (killed, out of memory, a crash in
    a native library) is restarted: the message it held fails for this round, as a crashed
    `flwr-clientapp` would in Flower's subprocess mode, and the next round finds a fresh
    one. One that dies before it ever served (a broken install) would die again: the agent
    ends with a one-line error instead of looping.
    """
    ready.unlink(missing_ok=True)
    app = start_app()
    try:
        while True:
            code = node.poll()
            if code is not None:
                return code
            app_code = app.poll()
            if app_code is not None:
                try:
                    served = ready.read_text(encoding="utf-8").strip() == str(app.pid)
                except OSError:
                    served = False
                if not served:
                    raise FedLoraError(f"the ClientApp process exited with status {app_code} before it could serve "
                                       f"(its output is above; log {log_path})")
                _note(log_path, f"fedlora client: the ClientApp process {app.pid} exited with status {app_code}; "
                                "restarting it")
                time.sleep(RESTART_PAUSE)
                if node.poll() is None:
                    ready.unlink(missing_ok=True)
                    app = start_app()
                continue
            time.sleep(poll)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
