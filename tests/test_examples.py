"""The examples run as they are, so that they cannot rot."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart(tmp_path, monkeypatch):
    try:
        import matplotlib
        matplotlib.use("Agg")  # plt.show() draws nothing
    except ImportError:
        pass  # the example skips its plots
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    run = names["run"]
    assert run.out.resolve() == (tmp_path / "dctstream-quickstart" / "out").resolve()
    assert run.record["state"] == "finished" and len(run.spots) >= 20
    assert names["same"] and len(names["in_memory"]) == len(run.spots)
    if names["plt"] is not None:
        assert set(names["figures"]) >= {"detector", "spots_per_psi", "integrals"}
        for name in names["figures"]:
            assert (tmp_path / "dctstream-quickstart" / f"{name}.png").stat().st_size > 10_000, name
        names["plt"].close("all")
