"""Trigger the dctstream workflow when Bliss starts a DCT scan: a blissoda-style processor.

blissoda processors listen to the scans Bliss publishes (blissdata) and hand
each one to an ewoks workflow, run by an ewoksjob (Celery) worker.  This one
submits the packaged dctstream workflow for every new scan whose name matches
``scan_pattern``, reading the scan live from Redis (``source.protocol: bliss``)
while it is acquired.  Without ewoksjob (or with ``local=True``) the workflow
runs in this process instead, one scan after the other.

    python examples/blissoda_processor.py redis://id11-bliss:25002 /data/visitor/ma1234/id11/PROCESSED_DATA \\
        --pattern 'dct_*' --queue dctstream

Beamline specifics (the ewoksjob queue, the output tree, the config) are the
arguments; in a blissoda processor class they are its persistent parameters.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
from pathlib import Path

from dctstream.ewoks_tasks import workflow_path

log = logging.getLogger("dctstream.processor")


class DctstreamProcessor:
    def __init__(self, redis_url: str, out_root: str, *, scan_pattern: str = "dct*", config: str | None = None,
                 overrides: tuple[str, ...] = (), queue: str | None = None, local: bool = False):
        self.redis_url, self.out_root, self.scan_pattern = redis_url, Path(out_root), scan_pattern
        self.config, self.overrides, self.queue, self.local = config, list(overrides), queue, local

    def workflow_inputs(self, scan_key: str, scan_name: str, scan_number: int) -> list[dict]:
        """The inputs of the packaged workflow's one node for this scan."""
        values = {"source": self.redis_url, "out_dir": str(self.out_root / f"{scan_name}_{scan_number}_dctstream"),
                  "overrides": [f"source.scan={scan_key}", *self.overrides]}
        if self.config:
            values["config"] = self.config
        return [{"id": "process_scan", "name": name, "value": value} for name, value in values.items()]

    def on_new_scan(self, scan) -> object | None:
        """Called for every new scan (a blissdata Scan); returns the job (or the local result) or None."""
        if not fnmatch.fnmatchcase(scan.name, self.scan_pattern):
            return None
        inputs = self.workflow_inputs(scan.key, scan.name, scan.number)
        log.info("scan %s (%s): dctstream workflow -> %s", scan.key, scan.name, inputs[1]["value"])
        if not self.local:
            try:
                from ewoksjob.client import submit
            except ImportError:
                log.warning("ewoksjob is not installed: running the workflow here")
            else:
                return submit(args=(str(workflow_path()),), kwargs={"inputs": inputs}, queue=self.queue)
        from ewokscore import execute_graph

        return execute_graph(str(workflow_path()), inputs=inputs)

    def run(self, max_scans: int | None = None, since: str | None = None) -> list:
        """Follow Bliss's scans, one after the other, from those created after ``since`` (a timetag of
        blissdata's; default: from now), until ``max_scans`` matching scans were handed over; returns
        what each hand-over returned."""
        from blissdata.redis_engine.store import DataStore

        store = DataStore(self.redis_url)
        since = since or store.get_last_scan_timetag()
        handed = []
        while max_scans is None or len(handed) < max_scans:
            since, key = store.get_next_scan(since=since)
            result = self.on_new_scan(store.load_scan(key))
            if result is not None:
                handed.append(result)
        return handed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("redis_url")
    parser.add_argument("out_root")
    parser.add_argument("--pattern", default="dct*")
    parser.add_argument("--config", help="dctstream config file or packaged config name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--queue", help="the ewoksjob (Celery) queue of the dctstream workers")
    parser.add_argument("--local", action="store_true", help="run the workflow here, not on a worker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    DctstreamProcessor(args.redis_url, args.out_root, scan_pattern=args.pattern, config=args.config,
                       overrides=tuple(args.set), queue=args.queue, local=args.local).run()


if __name__ == "__main__":
    main()
