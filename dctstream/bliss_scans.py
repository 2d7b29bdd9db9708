"""``dctstream watch redis://host:port``: the scans Bliss publishes through blissdata, one after the other.

`BlissScanFinder` waits for new scans with blissdata's own API
(``DataStore.get_next_scan`` from the last scan there when the daemon
started, so no scan created meanwhile is missed) and keeps those that match
every ``watch.scan_filter``: ``GLOB`` (the scan's name) or ``KEY=GLOB`` (a
key of the scan's info, e.g. ``title=fscan diffrz*``, or of its identity,
e.g. ``dataset=sample_*``).  Each kept scan is a `BlissScan` whose
``dctstream run`` child reads it with ``source.scan`` set to its key; its
results go to ``output.dir/<proposal>/<collection>/<dataset>/<number>_<name>``
(the identity's folders that Bliss gave it; without a data policy, the stem
of its file).  A restarted daemon takes up again the scans of this server
that its predecessor left stopped or running, if Redis still has them.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .config import Config
from .errors import InputError
from .record import RUN_FILE, read_record
from .sources.bliss import _blissdata

log = logging.getLogger(__name__)

# identity fields a filter may name (blissdata's ESRFIdentityModel)
IDENTITY = ("name", "number", "data_policy", "session", "proposal", "collection", "dataset", "path")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class BlissScan:
    """One scan Bliss published, and the folder its results go to."""

    server: str  # redis://host:port
    scan_key: str  # esrf:scan:...
    name: str
    number: int
    out_dir: Path

    @property
    def key(self) -> tuple[str, str]:
        return (self.server, self.scan_key)

    @property
    def label(self) -> str:
        return f"{self.scan_key} ({self.name} {self.number})"

    def run_args(self) -> list[str]:
        return ["--source", self.server, "--set", f"source.scan={self.scan_key}", "--out", str(self.out_dir)]

    retry_on_change: ClassVar[bool] = False  # an incomplete Bliss scan (aborted, failed) is over


def parse_filter(text: str) -> tuple[str | None, str]:
    """``GLOB`` -> (None, GLOB): the scan's name; ``KEY=GLOB`` -> (KEY, GLOB)."""
    key, sep, glob = text.partition("=")
    return (key.strip(), glob) if sep and key.strip() else (None, text)


def matches(scan, filters: list[tuple[str | None, str]]) -> bool:
    """Whether a blissdata scan passes every filter (a key the scan lacks passes none)."""
    for key, glob in filters:
        if key is None:
            value = scan.name
        elif key in scan.info:
            value = scan.info[key]
        elif key in IDENTITY:
            value = getattr(scan, key, None)
        else:
            return False
        if value is None or not fnmatch.fnmatchcase(str(value), glob):
            return False
    return True


def out_folder(out_root: Path, scan) -> Path:
    """Where a scan's results go: its identity's folders, then ``<number>_<name>``."""
    parts = [getattr(scan, field, None) for field in ("proposal", "collection", "dataset")]
    parts = [str(p) for p in parts if p]
    path = getattr(scan, "path", None)
    if not parts and path:
        parts = [Path(str(path)).stem]
    return out_root.joinpath(*(_UNSAFE.sub("_", p) for p in parts), _UNSAFE.sub("_", f"{scan.number}_{scan.name}"))


class BlissScanFinder:
    """New scans on a blissdata server that pass the filters, in the order Bliss created them."""

    def __init__(self, url: str, cfg: Config):
        DataStore, _, _, self._NoScanAvailable = _blissdata("dctstream watch redis://")
        self.url = url
        self.filters = [parse_filter(f) for f in cfg.watch.scan_filter]
        self.out_root = Path(cfg.output.dir).resolve()
        self._unreachable = False
        try:
            self._store = DataStore(url)
            self._since = self._store.get_last_scan_timetag()  # scans from now on are new
        except Exception as exc:  # redis' ConnectionError, or a server without blissdata's modules
            raise InputError(f"{url}: cannot reach the blissdata server ({' '.join(str(exc).split())}), "
                             "expected Redis with blissdata's modules") from None

    def describe(self) -> str:
        return f"{self.url} (scans matching {' and '.join(map(repr, self.filters_text())) or 'anything'})"

    def filters_text(self) -> list[str]:
        return [glob if key is None else f"{key}={glob}" for key, glob in self.filters]

    def new_scans(self) -> list[BlissScan]:
        """The matching scans created since the last call (never blocks)."""
        found = []
        while True:
            try:
                self._since, key = self._store.get_next_scan(since=self._since, block=False)
            except self._NoScanAvailable:
                self._reachable()
                return found
            except Exception as exc:  # the server went away (restarted, network): asked again at the next look
                if not self._unreachable:
                    log.warning("%s: cannot reach the blissdata server (%s): trying again", self.url,
                                " ".join(str(exc).split()))
                self._unreachable = True
                return found
            self._reachable()
            scan = self._load(key)
            if scan is None:
                continue
            if not matches(scan, self.filters):
                log.info("%s: %s (%s %s) does not match the filters, skipped", self.url, key, scan.name, scan.number)
                continue
            out = out_folder(self.out_root, scan)
            taken = (((read_record(out) or {}).get("config") or {}).get("source") or {}).get("scan")
            if taken and taken != scan.key:  # the same name and number again (Redis was emptied): kept apart
                out = out.with_name(f"{out.name}_{_UNSAFE.sub('_', scan.key.rsplit(':', 1)[-1])}")
            found.append(self._scan(scan, out))

    def _reachable(self) -> None:
        if self._unreachable:
            log.info("%s: the blissdata server answers again", self.url)
            self._unreachable = False

    def left_unfinished(self) -> list[BlissScan]:
        """Scans of this server whose runs were stopped (or killed) under ``out_root``, still in Redis."""
        found = []
        for record_path in sorted(self.out_root.rglob(RUN_FILE)):
            if any(part.startswith(".") for part in record_path.relative_to(self.out_root).parts):
                continue  # results set aside by --overwrite (OUT/.dctstream/previous), not a run's folder
            record = read_record(record_path.parent) or {}
            source = (record.get("config") or {}).get("source") or {}
            if record.get("state") not in ("stopped", "running") or source.get("url") != self.url:
                continue
            key = source.get("scan") or ""
            scan = self._load(key) if ":scan:" in key else None
            if scan is not None:
                found.append(self._scan(scan, record_path.parent))
        return found

    def _load(self, key: str):
        try:
            return self._store.load_scan(key)
        except Exception as exc:  # expired or deleted since it was announced
            log.warning("%s: scan %s cannot be loaded (%s), skipped", self.url, key, " ".join(str(exc).split()))
            return None

    def _scan(self, scan, out_dir: Path) -> BlissScan:
        return BlissScan(self.url, scan.key, str(scan.name), int(scan.number), out_dir)
