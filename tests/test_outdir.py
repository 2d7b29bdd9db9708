"""The output folder's lock (`dctstream.outdir.OutputLock`)."""

from __future__ import annotations

import errno

import pytest

from dctstream import outdir
from dctstream.errors import OutputError


def test_a_full_disk_when_the_lock_is_written_is_one_error_naming_the_lock(tmp_path, monkeypatch):
    """The lock file names its holder; with no space left for that line (a run resumed on a full disk), the
    refusal named nothing: ``dctstream: error: [Errno 28] No space left on device``."""
    real_write = outdir.os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outdir.os, "write", full)
    with pytest.raises(OutputError) as caught:
        outdir.OutputLock(tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'out' / '.dctstream' / 'lock'}: cannot write output, "
                              "No space left on device"), message
    assert "run the same command again" in message
    monkeypatch.setattr(outdir.os, "write", real_write)
    lock = outdir.OutputLock(tmp_path / "out")  # not held by the failed attempt
    assert lock.held
    lock.release()
