"""shared/atomic.py: a failed write leaves the earlier file as it was, and no temporary file."""

import stat

import pytest

from shared.atomic import atomic_write


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ledger.json"
    atomic_write(path, "old", durable=True)

    def fail_halfway(fh):
        fh.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_modes(tmp_path):
    atomic_write(tmp_path / "key", b"secret", private=True)
    atomic_write(tmp_path / "cert", b"public")
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cert").stat().st_mode) == 0o644
    assert (tmp_path / "key").read_bytes() == b"secret"
