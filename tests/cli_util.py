"""Running ``dctstream`` as a user does, and checking what it says: shared by the CLI and bad-input tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ERROR_PREFIX = "dctstream: error: "
SUBPROCESS_TIMEOUT_S = 120


def cli(*args, cwd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dctstream", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S, **kw)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_one_line_error(code: int, stdout: str, stderr: str, expected_code: int, needles) -> str:
    """The run failed with ``expected_code`` and one ``dctstream: error:`` line holding every needle.

    Log lines (``HH:MM:SS LEVEL ...``) before it are allowed: a run that fails mid-scan has logged its progress.
    """
    assert "Traceback" not in stderr, stderr
    assert code == expected_code, stderr
    lines = [line for line in stderr.splitlines() if not _is_log_line(line)]
    assert len(lines) == 1, f"expected one error line on stderr, got:\n{stderr}"
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert stdout == "", stdout
    return line


def _is_log_line(line: str) -> bool:
    parts = line.split(" ", 2)
    return len(parts) == 3 and len(parts[0]) == 8 and parts[0][2] == ":" and parts[1] in ("INFO", "WARNING", "DEBUG")
