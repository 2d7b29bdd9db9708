"""``dctstream campaign``: scans listed, processed on a LocalCluster of 2 worker processes, restarted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_util import SUBPROCESS_TIMEOUT_S, snapshot
from dctstream import checkpoint
from rich.console import Console

from dctstream.campaign import (
    RESEGMENT_SUMMARY_FILE,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    Campaign,
    jobqueue_cluster,
    list_runs,
    list_scans,
    process_job,
    render_running,
    summary_table,
    write_summary,
)
from dctstream.cli import main
from dctstream.config import load_config
from dctstream.errors import ConfigError, InputError
from dctstream.record import read_record
from dctstream.resegment import resegment
from dctstream.runner import process_scan
from dctstream.status import write_json_atomic
from simulators.dct_scan import simulate_scan
from test_resume import assert_same_outputs, outputs

distributed = pytest.importorskip("distributed")

FRAMES, SIZE = 40, 64
OVERRIDES = ["background.window=11", "segmentation.max_blob_size=[20,20,5]", "output.checkpoint_every_frames=6",
             "quicklook.enabled=false"]
CLUSTER_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two scan files a.h5, b.h5 and a bad one, c.h5, whose frames are a 2-D image."""
    folder = tmp_path_factory.mktemp("campaign")
    for seed, name in enumerate("ab"):
        simulate_scan(folder / f"{name}.h5", frames=FRAMES, size=SIZE, spots=12, seed=seed + 7)
    with h5py.File(folder / "c.h5", "w") as f:
        f["/1.1/measurement/marana"] = np.zeros((SIZE, SIZE), np.uint16)
    return folder


@pytest.fixture(scope="module")
def references(scans, tmp_path_factory):
    """Outputs of a and b processed by one ``dctstream run`` each, here (which also compiles the kernels once,
    before the workers need them)."""
    out = {}
    for job in list_scans([str(scans / "a.h5"), str(scans / "b.h5")], tmp_path_factory.mktemp("ref"),
                          overrides=OVERRIDES):
        process_scan(job.cfg, display=False)
        out[job.name] = outputs(Path(job.cfg.output.dir))
    return out


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as c:
        yield c


def _killed_mid_scan(url: str, angles: str, out: Path) -> None:
    """``dctstream run`` SIGKILLed while writing its 3rd checkpoint, leaving the 2nd."""
    # the packaged default, as the campaign's job: the dark found in the file (dark.url: auto)
    args = ["run", "--source", url, "--set", f"source.angles={angles}", "--out", str(out),
            *[a for o in OVERRIDES for a in ("--set", o)]]
    proc = subprocess.run([sys.executable, "-m", "dctstream", *args], capture_output=True, text=True,
                          env={**os.environ, "DCTSTREAM_CRASH_AT": "checkpoint:3"}, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == -9, proc.stderr
    assert (read_record(out) or {}).get("state") in (None, "running")  # killed, maybe before its first record
    assert checkpoint.load(out) is not None


def test_three_scans_one_killed_and_resumed_one_bad_then_nothing_repeated(scans, references, client, tmp_path):
    out = tmp_path / "out"
    specs = [str(scans / "a.h5"), str(scans / "b.h5"), f"{scans / 'c.h5'}::/1.1/measurement/marana"]
    jobs = list_scans(specs, out, overrides=OVERRIDES)
    assert [job.name for job in jobs] == ["a_1.1", "b_1.1", "c_1.1"]
    assert jobs[1].cfg.source.angles == f"{scans / 'b.h5'}::/1.1/measurement/diffrz"  # found in the file
    _killed_mid_scan(jobs[1].cfg.source.url, jobs[1].cfg.source.angles, out / "b_1.1")

    rows = Campaign(jobs, out).run(client)

    assert rows[1].get("error") is None, rows[1]
    assert [(r["scan"], r["state"]) for r in rows] == [("a_1.1", "finished"), ("b_1.1", "resumed"),
                                                       ("c_1.1", "failed")]
    assert "c.h5" in rows[2]["error"] and "\n" not in rows[2]["error"]
    assert read_record(out / "c_1.1")["state"] == "failed"
    assert "from its checkpoint at frame" in (out / "b_1.1" / "run.log").read_text()
    for row in rows[:2]:
        assert_same_outputs(outputs(out / row["scan"]), references[row["scan"]])
        assert row["frames"] == FRAMES and row["spots"] == len(references[row["scan"]]["difspots"])
        assert row["noise_sigma"] > 0 and row["time_s"] > 0
    lines = (out / SUMMARY_FILE).read_text().splitlines()
    assert lines[0].split("\t") == list(SUMMARY_COLUMNS)
    assert [line.split("\t")[:4] for line in lines[1:]] == [
        [r["scan"], r["state"], str(r["frames"] or ""), str(r["spots"] or "")] for r in rows]

    # the same command again, from the command line, on the same scheduler: the finished scans are skipped, untouched
    done = {name: snapshot(out / name) for name in ("a_1.1", "b_1.1")}
    proc = subprocess.run([sys.executable, "-m", "dctstream", "campaign", *specs, "--out", str(out),
                           "--cluster", client.scheduler.address,
                           *[a for o in OVERRIDES for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr  # c failed again
    assert "1 of 3 scans failed; first: c_1.1" in proc.stderr and "Traceback" not in proc.stderr
    again = [line.split("\t") for line in (out / SUMMARY_FILE).read_text().splitlines()[1:]]
    assert [row[:2] for row in again] == [["a_1.1", "skipped"], ["b_1.1", "skipped"], ["c_1.1", "failed"]]
    assert {name: snapshot(out / name) for name in done} == done


def test_a_scan_listing_with_names_overrides_and_paths_relative_to_it(scans, tmp_path):
    listing = tmp_path / "campaign.yml"
    rel = os.path.relpath(scans, tmp_path)
    listing.write_text(f"scans:\n  - {rel}/a.h5\n"
                       f"  - source: {rel}/b.h5::/1.1/measurement/marana\n"
                       f"    name: b_load3\n    set: {{background.window: 21}}\n")
    jobs = list_scans([str(listing)], tmp_path / "out", overrides=OVERRIDES)
    assert [job.name for job in jobs] == ["a_1.1", "b_load3"]
    assert [job.cfg.background.window for job in jobs] == [11, 21]
    assert jobs[1].cfg.output.dir == str(tmp_path / "out" / "b_load3")
    assert Path(jobs[1].cfg.source.url.partition("::")[0]).resolve() == scans / "b.h5"


def test_a_scan_file_gets_the_dark_dctstream_run_finds_in_it(scans, tmp_path):
    """Without a config file a campaign took the built-in defaults, which find no dark (run and watch take the
    packaged default, whose dark.url: auto finds the file's dark scan): 3.7 % less intensity, unsaid."""
    from dctstream.sources.scan_file import resolve_auto

    job = list_scans([str(scans / "a.h5")], tmp_path / "out", overrides=OVERRIDES)[0]
    resolved, _ = resolve_auto(job.cfg)
    assert resolved.dark.url == f"{scans / 'a.h5'}::/2.1/measurement/marana"


@pytest.mark.parametrize("text, message", [
    ("scans:\n  - source: x.h5\n    colour: red\n", "campaign.yml: scans[0].colour: unknown key (known: angles, "
                                                   "dark, name, set, source)"),
    ("- x.h5\n", "campaign.yml: expected a mapping with one key, scans: a list of scans, got list"),
    ("scans:\n  - 5\n", "campaign.yml: scans[0]: expected a file, a file.h5::/dataset URL or a mapping with "
                        "source:, got 5"),
])
def test_bad_listing_is_one_line_naming_the_entry(tmp_path, text, message):
    (tmp_path / "campaign.yml").write_text(text)
    with pytest.raises(ConfigError) as info:
        list_scans([str(tmp_path / "campaign.yml")], tmp_path / "out")
    assert str(info.value) == f"{tmp_path / 'campaign.yml'}: {message.removeprefix('campaign.yml: ')}"


def test_a_scans_bad_setting_fails_that_scan_only(scans, tmp_path):
    listing = tmp_path / "campaign.yml"
    listing.write_text(f"scans:\n  - {scans}/a.h5\n  - source: {scans}/b.h5\n    set: {{background.window: 4}}\n"
                       f"  - {scans}/missing.h5::/1.1/measurement/marana\n")
    jobs = list_scans([str(listing)], tmp_path / "out")
    assert jobs[0].error is None
    assert jobs[1].cfg is None and jobs[1].error == (
        f"{listing}: scans[1].set: background.window: must be odd and >= 3, got 4")
    assert jobs[2].error == f"{scans}/missing.h5: no such file, expected a recorded scan"


def test_a_glob_matching_nothing_stops_the_campaign(tmp_path):
    with pytest.raises(InputError, match="no file matches"):
        list_scans([str(tmp_path / "*.h5")], tmp_path / "out")


def test_stems_repeating_in_two_folders_keep_their_folders(scans, tmp_path):
    for sub in ("load1", "load2"):
        (tmp_path / sub).mkdir()
        os.symlink(scans / "a.h5", tmp_path / sub / "a.h5")
    jobs = list_scans([str(tmp_path / "load*" / "a.h5")], tmp_path / "out")
    assert [job.name for job in jobs] == ["load1/a_1.1", "load2/a_1.1"]


def test_slurm_job_script_from_the_cluster_section(tmp_path):
    config = tmp_path / "slurm.yml"
    config.write_text("cluster: {kind: slurm, workers: 4, cores_per_worker: 8, memory_per_worker: 32GiB, "
                      "queue: id11, walltime: '02:30:00', account: ma1234, job_extra_directives: [--exclusive], "
                      "job_script_prologue: ['module load dctstream']}\n")
    cluster = jobqueue_cluster(load_config(config).cluster, scheduler_options={"dashboard_address": ":0"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ("#SBATCH -p id11", "#SBATCH -A ma1234", "#SBATCH -n 1", "#SBATCH --cpus-per-task=8",
                     "#SBATCH --mem=", "#SBATCH -t 02:30:00", "#SBATCH --exclusive"):
        assert any(line.startswith(expected) for line in directives), (expected, directives)
    assert "module load dctstream" in script
    worker = script.splitlines()[-1]
    # one worker process per job, taking one scan at a time whatever its cores
    assert "--nworkers" not in worker and "--nthreads 8" in worker and "--resources scan=1" in worker


def test_every_batch_system_gets_the_account_its_way(tmp_path):
    for kind, line in (("pbs", "#PBS -A ma1234"), ("sge", "#$ -P ma1234"), ("lsf", '#BSUB -P "ma1234"')):
        cfg = load_config(None, [f"cluster.kind={kind}", "cluster.memory_per_worker=8GiB", "cluster.account=ma1234"])
        cluster = jobqueue_cluster(cfg.cluster, scheduler_options={"dashboard_address": ":0"})
        try:
            assert line in cluster.job_script(), kind
        finally:
            cluster.close()


def test_a_worker_killed_mid_scan_is_replaced_and_its_scan_resumed(scans, references, client, tmp_path):
    """Dask runs the task of a worker that died (SIGKILL inside its 3rd checkpoint) again; the scan resumes
    from the checkpoint before and ends with the outputs of an uninterrupted run."""
    out = tmp_path / "out"
    job = list_scans([str(scans / "a.h5")], out, overrides=OVERRIDES)[0]
    doomed = sorted(client.scheduler_info()["workers"])[0]
    # a lambda travels by value and runs there (a bound os.environ method would carry a copy of ours)
    client.run(lambda: os.environ.update(DCTSTREAM_CRASH_AT="checkpoint:3"), workers=[doomed])
    try:
        future = client.submit(process_job, job, key="killed-worker-scan", pure=False, workers=[doomed],
                               allow_other_workers=True)
        row = future.result(timeout=CLUSTER_TIMEOUT_S)
    finally:
        client.run(lambda: os.environ.pop("DCTSTREAM_CRASH_AT", None))  # the replacement never had it anyway
    assert doomed not in client.scheduler_info()["workers"]  # it did die
    assert row["state"] == "resumed", row
    assert "from its checkpoint at frame" in (out / "a_1.1" / "run.log").read_text()
    assert_same_outputs(outputs(out / "a_1.1"), references["a_1.1"])


def test_summary_table_and_file(tmp_path):
    rows = [{"scan": "s1_1.1", "source": "s1.h5::/1.1/measurement/marana", "state": "finished", "frames": 3600,
             "spots": 1234, "noise_sigma": 2.2345, "time_s": 181.26, "warnings": ["slow disk:\n  34%"],
             "error": None, "out_dir": "out/s1_1.1"},
            {"scan": "s2_1.1", "source": "s2.h5", "state": "failed", "frames": None, "spots": None,
             "noise_sigma": None, "time_s": 0.0, "warnings": [], "error": "s2.h5: no such file", "out_dir": None}]
    write_summary(tmp_path / "campaign.tsv", rows)
    assert (tmp_path / "campaign.tsv").read_text().splitlines() == [
        "scan\tstate\tframes\tspots\tnoise_sigma\ttime_s\twarnings\terror\tout_dir",
        "s1_1.1\tfinished\t3600\t1234\t2.23\t181.3\tslow disk: 34%\t\tout/s1_1.1",
        "s2_1.1\tfailed\t\t\t\t0.0\t\ts2.h5: no such file\t"]
    # a second campaign into the same folder: its scans' rows replace theirs, the others' stay
    again = [{**rows[1], "state": "finished", "frames": 3600, "spots": 99, "error": None, "out_dir": "out/s2_1.1"},
             {**rows[0], "scan": "s3_1.1", "out_dir": "out/s3_1.1"}]
    write_summary(tmp_path / "campaign.tsv", again)
    assert [line.split("\t")[:2] for line in (tmp_path / "campaign.tsv").read_text().splitlines()[1:]] == [
        ["s1_1.1", "finished"], ["s2_1.1", "finished"], ["s3_1.1", "finished"]]
    console = Console(width=80, color_system=None, force_terminal=True, record=True)
    console.print(summary_table(rows))
    text = console.export_text()
    assert "│ s1_1.1 │ finished │   3600 │  1234 │  2.23 │ 181.3 s │ slow disk: 34%" in text
    assert "│ s2_1.1 │ failed   │        │       │       │   0.0 s │ s2.h5: no such file" in text


def test_the_view_counts_scans_and_reads_the_running_ones_status(scans, tmp_path):
    jobs = list_scans([str(scans / "a.h5"), str(scans / "b.h5"), f"{scans}/gone.h5::/1.1/x"], tmp_path / "out")
    campaign = Campaign(jobs, tmp_path / "out")
    campaign.rows["gone_1.1"] = {"state": "failed"}
    status = {"state": "running", "updated_utc": "2999-01-01T00:00:00+00:00", "memory_mb": 250.0,
              "stats": {"frames_total": 40, "frames_segmented": 12, "difspots_written": 5},
              "rates": {"processing_fps": 7.5}}
    (tmp_path / "out" / "b_1.1").mkdir(parents=True)
    write_json_atomic(tmp_path / "out" / "b_1.1" / "status.json", status)
    console = Console(width=120, color_system=None, force_terminal=True, record=True)
    console.print(render_running(campaign))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert lines[0].startswith("campaign of 3 scans: 0 done, 1 running, 1 failed, 0 skipped (finished before), "
                               "1 queued; 7.5 frames/s now, ")
    assert lines[-2].split() == ["scan", "frames", "frames/s", "difspots", "memory"]
    assert lines[-1].split() == ["b_1.1", "12/40", "7.5", "5", "250", "MB"]  # a's status.json: none, not started


def test_a_batch_system_without_memory_per_worker_is_refused_at_once(scans, tmp_path):
    from cli_util import assert_one_line_error, cli

    proc = cli("campaign", scans / "a.h5", "--cluster", "slurm", "--out", tmp_path / "out", cwd=Path.cwd())
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, 2,
                          ["cluster.memory_per_worker: must be set for the jobs of cluster.kind: slurm"])
    assert not (tmp_path / "out").exists()


def test_bench_campaign_counts_every_frame_of_every_scan(tmp_path):
    from dctstream.bench import bench_campaign, format_campaign

    report = bench_campaign(tmp_path, scans=2, frames=30, size=48, window=11, workers=(1,))
    (run,) = report["runs"]
    assert (run["workers"], run["frames"]) == (1, 2 * 30)
    assert run["frames_per_s"] == pytest.approx(run["frames"] / run["wall_s"])
    assert run["scans_per_min"] == pytest.approx(60 * 2 / run["wall_s"])
    assert len(list((tmp_path / "out_1").glob("scan_*_1.1/spots.h5"))) == 2
    assert format_campaign(report).splitlines()[2].split()[:2] == ["1", f"{run['wall_s']:.1f}"]


def test_resegment_a_campaign_from_its_sparse_scans(scans, client, tmp_path, capsys):
    """``campaign --resegment``: every run under a campaign's folder segmented again from its sparse scan, one
    Dask task each, as ``dctstream resegment`` does; the same command again skips them; a setting a
    resegmentation cannot change fails each run, not the campaign; a folder without runs is refused."""
    results = tmp_path / "results"
    for job in list_scans([str(scans / "a.h5"), str(scans / "b.h5")], results, overrides=OVERRIDES):
        process_scan(job.cfg, display=False)
    more = ["segmentation.seed_sigma=9"]
    jobs = list_runs([results], more)
    assert [job.name for job in jobs] == ["a_1.1", "b_1.1"]

    rows = Campaign(jobs, results, summary_file=RESEGMENT_SUMMARY_FILE).run(client)

    assert [row["state"] for row in rows] == ["finished", "finished"], rows
    for job, row in zip(jobs, rows):
        want = resegment(job.source, more, tmp_path / "want" / job.name)  # one process
        assert_same_outputs(outputs(Path(job.cfg.output.dir)), outputs(Path(want["out_dir"])))
        assert row["spots"] == want["difspots"] > 0
        assert "seed_sigma: 9" in "\n".join(outputs(Path(job.cfg.output.dir))["attrs"]["config"])
        assert job.cfg.output.dir == str(results / job.name / "resegmented") and row["frames"] == FRAMES
    assert (results / RESEGMENT_SUMMARY_FILE).is_file() and not (results / SUMMARY_FILE).exists()

    done = snapshot(results)
    code = main(["campaign", "--resegment", str(results), "--set", more[0], "--cluster", client.scheduler.address])
    assert code == 0, capsys.readouterr().err
    again = [line.split("\t") for line in (results / RESEGMENT_SUMMARY_FILE).read_text().splitlines()[1:]]
    assert [line[:2] for line in again] == [["a_1.1", "skipped"], ["b_1.1", "skipped"]]
    assert {k: v for k, v in snapshot(results).items() if k != RESEGMENT_SUMMARY_FILE} == \
        {k: v for k, v in done.items() if k != RESEGMENT_SUMMARY_FILE}

    bad = list_runs([results], ["background.window=5"])
    assert [job.cfg for job in bad] == [None, None] and "background.window" in bad[0].error
    with pytest.raises(InputError, match="no corrected.h5 in it or below it"):
        list_runs([tmp_path / "want" / "a_1.1"])
