"""Loading, validating and dumping run configurations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dctstream.config import (
    BackgroundConfig,
    Config,
    DirectBeamConfig,
    SegmentationConfig,
    config_to_dict,
    dump_config,
    load_config,
    override_config,
    replace_config,
)
from dctstream.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and shipped files ---------------------------------------------


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.background == BackgroundConfig(window=501, mode="exact", stride=50, normalise="auto", margin_px=20)
    assert cfg.filter.median_size == 3
    assert cfg.direct_beam == DirectBeamConfig(bbox="auto", margin_px=2)
    assert cfg.segmentation == SegmentationConfig(
        seed_threshold="auto", seed_sigma=6.0, grow_ratio=0.3, grow_low="auto", grow_high=None,
        seed_min_voxels=3, min_blob_size=(2, 2, 1), max_blob_size=(80, 80, 25), connectivity=26,
    )
    assert cfg.source.url is None and cfg.dark.url is None and cfg.dark.value is None
    assert cfg.output.dir == "dctstream_out"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().background.window = 3  # type: ignore[misc]


def test_default_yml_equals_defaults_but_finds_angles_dark_and_flat():
    packaged = load_config(CONFIGS / "default.yml")
    assert packaged == replace_config(load_config(None), source={"angles": "auto"}, dark={"url": "auto"},
                                      detector={"flat": "auto"})


def documented_keys(text: str) -> set[str]:
    """'section.key' of every key line that has a comment beside it or on the line above."""
    found, section, previous = set(), None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.split(":")[0]
        elif stripped and not stripped.startswith("#") and ":" in stripped:
            if previous.startswith("#") or " #" in stripped:
                found.add(f"{section}.{stripped.split(':')[0]}")
        if stripped:
            previous = stripped
    return found


def test_default_yml_documents_every_field():
    expected = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory)
    }
    assert documented_keys((CONFIGS / "default.yml").read_text()) == expected


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_slurm_campaign_example():
    cluster = load_config(CONFIGS / "slurm_campaign.yml").cluster
    assert (cluster.kind, cluster.workers, cluster.cores_per_worker, cluster.memory_per_worker) == (
        "slurm", 10, 4, "24GiB")
    assert cluster.walltime == "04:00:00" and cluster.job_extra_directives == ("--exclusive",)


def test_live_hdf5_takes_the_histogram_median(tiny_scan, tiny_overrides, tmp_path):
    """Its margin normalisation keeps integer frames integer, so the median is the windowed histogram, not the
    sorted float window (7.8 GiB at 2048 x 2048 with its window of 501); binned to a mean, frames are float."""
    from dctstream.pipeline import Pipeline

    def median_of(*more):
        cfg = load_config(CONFIGS / "live_hdf5.yml", [
            f"source.url={tiny_scan.frames_url}", f"source.angles={tiny_scan.angles_url}",
            f"dark.url={tiny_scan.dark_url}", "source.protocol=hdf5", f"output.dir={tmp_path / str(len(more))}",
            *tiny_overrides, *more])
        pipeline = Pipeline(cfg)
        pipeline.run()
        bg = pipeline.background
        return "histogram" if bg._hist is not None else "sorted" if bg._sorted is not None else "selection"

    assert median_of() == "histogram"
    assert median_of("detector.binning=2", "detector.binning_mode=mean") == "sorted"


def test_sim512():
    cfg = load_config(CONFIGS / "sim512.yml")
    assert cfg.source.url == "scan512.h5::/1.1/measurement/marana"
    assert cfg.source.angles == "scan512.h5::/1.1/measurement/diffrz"
    assert cfg.dark.url == "scan512.h5::/2.1/measurement/marana"
    assert cfg.output.dir == "scan512_out"
    assert cfg == replace_config(
        Config(),
        source={"url": cfg.source.url, "angles": cfg.source.angles},
        dark={"url": cfg.dark.url},
        background={"window": 101, "normalise": "margin"},
        output={"dir": "scan512_out"},
    )


# -- reading values ------------------------------------------------------------


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "dark:\nsegmentation:\n")) == Config()


def test_ints_become_floats_and_null_bbox_means_none(tmp_path):
    cfg = load_config(write(tmp_path, "dark: {value: 100}\nsegmentation: {seed_threshold: 50, grow_low: 1e1}\n"
                                      "direct_beam: {bbox: null}\n"))
    assert cfg.dark.value == 100.0 and isinstance(cfg.dark.value, float)
    assert cfg.segmentation.seed_threshold == 50.0 and isinstance(cfg.segmentation.seed_threshold, float)
    assert cfg.segmentation.grow_low == 10.0  # 1e1 is a number, not PyYAML's string "1e1"
    assert cfg.direct_beam.bbox == "none"


def test_lists_become_tuples(tmp_path):
    cfg = load_config(write(tmp_path, "direct_beam: {bbox: [10, 20, 100, 50]}\n"
                                      "segmentation: {min_blob_size: [1, 1, 1], max_blob_size: [9, 9, 9]}\n"))
    assert cfg.direct_beam.bbox == (10, 20, 100, 50)
    assert cfg.segmentation.min_blob_size == (1, 1, 1)
    assert cfg.segmentation.max_blob_size == (9, 9, 9)


@pytest.mark.parametrize(("override", "section", "key", "value"), [
    ("background.window=101", "background", "window", 101),
    ("direct_beam.bbox=[10,20,100,50]", "direct_beam", "bbox", (10, 20, 100, 50)),
    ("dark.value=100", "dark", "value", 100.0),
    ("segmentation.grow_high=null", "segmentation", "grow_high", None),
    ("background.mode=block", "background", "mode", "block"),
    ("source.url=scan.h5::/1.1/measurement/marana", "source", "url", "scan.h5::/1.1/measurement/marana"),
    ("segmentation.seed_threshold=1e3", "segmentation", "seed_threshold", 1000.0),
    ("background={window: 11, stride: 5}", "background", "stride", 5),
])
def test_override(tmp_path, override, section, key, value):
    path = write(tmp_path, "segmentation: {grow_high: 500}\n")
    assert getattr(getattr(load_config(path, [override]), section), key) == value


def test_numpy_values_override_as_python_ones():
    """Overrides computed with NumPy (the Python API) are taken as the numbers and lists they hold, and a
    wrong one gets the one-line error (a NumPy integer was refused, and its message crashed in YAML)."""
    cfg = override_config(Config(), {"background.window": np.int64(101),
                                     "segmentation.min_blob_size": np.array([2, 3, 1]),
                                     "segmentation.grow_ratio": np.float64(0.25)})
    assert cfg.background.window == 101 and type(cfg.background.window) is int
    assert cfg.segmentation.min_blob_size == (2, 3, 1) and cfg.segmentation.grow_ratio == 0.25
    with pytest.raises(ConfigError, match=r"background.window: must be an integer, got 1.5"):
        override_config(Config(), {"background.window": np.float64(1.5)})


def test_overrides_apply_in_order():
    cfg = load_config(None, ["background.window=11", "background.window=13"])
    assert cfg.background.window == 13


def test_replace_config_checks_values():
    cfg = replace_config(Config(), background={"window": 11}, direct_beam={"bbox": [0, 0, 5, 5]})
    assert cfg.background.window == 11 and cfg.direct_beam.bbox == (0, 0, 5, 5)
    with pytest.raises(ConfigError, match=r"^replace_config: background.window: must be odd and >= 3, got 4$"):
        replace_config(cfg, background={"window": 4})


# -- dumping -------------------------------------------------------------------


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config(None, ["direct_beam.bbox=[1,2,3,4]"]))
    assert list(d) == ["source", "dark", "background", "filter", "direct_beam", "segmentation", "output",
                       "status", "quicklook", "watch", "detector", "export", "cluster"]
    assert d["direct_beam"]["bbox"] == [1, 2, 3, 4]
    assert d["segmentation"]["max_blob_size"] == [80, 80, 25]


def test_dump_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "sim512.yml", ["direct_beam.bbox=[1,2,3,4]", "segmentation.grow_high=1e-5"])
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(half=st.integers(min_value=1, max_value=10**6))
def test_any_odd_window_round_trips(tmp_path, half):
    cfg = load_config(None, [f"background.window={2 * half + 1}"])
    assert cfg.background.window == 2 * half + 1
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


@given(half=st.integers(min_value=-10**6, max_value=10**6))
def test_any_even_window_is_rejected(half):
    assert error_of(None, [f"background.window={2 * half}"]) == (
        f"--set: background.window: must be odd and >= 3, got {2 * half}"
    )


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(("snippet", "message"), [
    # types
    ("background: {window: 4.5}", "background.window: must be an integer, got 4.5"),
    ("background: {window: '501'}", "background.window: must be an integer, got '501'"),
    ("background: {window: true}", "background.window: must be an integer, got true"),
    ("dark: {value: true}", "dark.value: must be a number or null, got true"),
    ("dark: {value: 100 counts}", "dark.value: must be a number or null, got 100 counts"),
    ("segmentation: {seed_sigma: .inf}", "segmentation.seed_sigma: must be a finite number, got .inf"),
    ("segmentation: {seed_threshold: false}", "segmentation.seed_threshold: must be a number or auto, got false"),
    ("segmentation: {connectivity: 6.0}", "segmentation.connectivity: must be one of 6, 26, got 6.0"),
    ("source: {url: 5}", "source.url: must be a non-empty string or null, got 5"),
    ("output: {dir: ''}", "output.dir: must be a non-empty string, got ''"),
    ("output: {dir: null}", "output.dir: must be a non-empty string, got null"),
    # values
    ("background: {window: 4}", "background.window: must be odd and >= 3, got 4"),
    ("background: {window: 1}", "background.window: must be odd and >= 3, got 1"),
    ("background: {mode: fast}", "background.mode: must be one of exact, block, got fast"),
    ("background: {stride: 0}", "background.stride: must be >= 1, got 0"),
    ("background: {normalise: full}", "background.normalise: must be one of auto, none, margin, got full"),
    ("background: {margin_px: 0}", "background.margin_px: must be >= 1, got 0"),
    ("filter: {median_size: 2}", "filter.median_size: must be odd and >= 1, got 2"),
    ("direct_beam: {margin_px: -1}", "direct_beam.margin_px: must be >= 1, got -1"),
    ("direct_beam: {bbox: [1, 2, 3]}",
     "direct_beam.bbox: must be auto, none or a list of 4 integers [x0, y0, width, height], got [1, 2, 3]"),
    ("direct_beam: {bbox: [0, 0, 10.5, 10]}",
     "direct_beam.bbox: must be auto, none or a list of 4 integers [x0, y0, width, height], got [0, 0, 10.5, 10]"),
    ("direct_beam: {bbox: [-1, 0, 10, 10]}",
     "direct_beam.bbox: must have x0, y0 >= 0 and width, height >= 1, got [-1, 0, 10, 10]"),
    ("direct_beam: {bbox: [0, 0, 0, 10]}",
     "direct_beam.bbox: must have x0, y0 >= 0 and width, height >= 1, got [0, 0, 0, 10]"),
    ("segmentation: {seed_threshold: 0}", "segmentation.seed_threshold: must be > 0 or auto, got 0"),
    ("segmentation: {seed_threshold: manual}", "segmentation.seed_threshold: must be a number or auto, got manual"),
    ("segmentation: {seed_sigma: 0}", "segmentation.seed_sigma: must be > 0, got 0"),
    ("segmentation: {grow_ratio: 0}", "segmentation.grow_ratio: must be in (0, 1], got 0"),
    ("segmentation: {grow_ratio: 1.5}", "segmentation.grow_ratio: must be in (0, 1], got 1.5"),
    ("segmentation: {grow_low: -2}", "segmentation.grow_low: must be > 0 or auto, got -2"),
    ("segmentation: {grow_high: 0}", "segmentation.grow_high: must be > 0 or null, got 0"),
    ("segmentation: {seed_min_voxels: 0}", "segmentation.seed_min_voxels: must be >= 1, got 0"),
    ("segmentation: {connectivity: 8}", "segmentation.connectivity: must be one of 6, 26, got 8"),
    ("segmentation: {min_blob_size: [2, 2]}",
     "segmentation.min_blob_size: must be a list of 3 integers [x, y, frames], got [2, 2]"),
    ("segmentation: {max_blob_size: [80, 80, true]}",
     "segmentation.max_blob_size: must be a list of 3 integers [x, y, frames], got [80, 80, true]"),
    ("segmentation: {min_blob_size: [0, 2, 1]}",
     "segmentation.min_blob_size: must be >= 1 in every component, got [0, 2, 1]"),
    ("detector: {binning: 3}", "detector.binning: must be one of 1, 2, 4, got 3"),
    ("detector: {flat_floor: 1}", "detector.flat_floor: must be in (0, 1), got 1"),
    ("detector: {auto_mask: 1}", "detector.auto_mask: must be true or false, got 1"),
    ("export: {percentiles: [99, 1]}",
     "export.percentiles: must be [low, high] with 0 <= low < high <= 100, got [99, 1]"),
    ("export: {dtype: int8}", "export.dtype: must be one of float32, uint16, uint8, got int8"),
    # cross-field rules
    ("dark: {value: 100, estimate: true}", "dark.estimate: must be false when dark.url or dark.value is set, got true"),
    ("dark: {url: 'd.h5::/2.1/measurement/marana', value: 100}",
     "dark.value: must be null when dark.url is set, got 100.0"),
    ("background: {mode: block, window: 11, stride: 12}",
     "background.stride: must be <= background.window (11) in block mode, got 12"),
    ("background: {normalise: margin}\ndirect_beam: {bbox: none}",
     "background.normalise: must be none when direct_beam.bbox is none, got margin"),
    ("background: {normalise: margin}\ndirect_beam: {bbox: null}",
     "background.normalise: must be none when direct_beam.bbox is none, got margin"),
    ("segmentation: {grow_low: 50, grow_high: 10}",
     "segmentation.grow_high: must be >= segmentation.grow_low (50.0), got 10.0"),
    ("segmentation: {min_blob_size: [5, 5, 5], max_blob_size: [80, 4, 25]}",
     "segmentation.max_blob_size: must be >= segmentation.min_blob_size [5, 5, 5] in every component, got [80, 4, 25]"),
    # structure
    ("backgrond: {window: 5}",
     "backgrond: unknown section (known: background, cluster, dark, detector, direct_beam, export, filter, output, "
     "quicklook, segmentation, source, status, watch)"),
    ("background: {windw: 5}", "background.windw: unknown key (known: batch_frames, margin_px, mode, normalise, stride, window)"),
    ("background: 5", "background: must be a mapping, got 5"),
    ("- background", "must be a mapping of sections, got [background]"),
    # cluster
    ("cluster: {kind: oar}", "cluster.kind: must be one of local, slurm, pbs, sge, lsf, address, got oar"),
    ("cluster: {workers: 0}", "cluster.workers: must be >= 1, got 0"),
    ("cluster: {memory_per_worker: 16}", "cluster.memory_per_worker: must be a non-empty string or null, got 16"),
    ("cluster: {memory_per_worker: lots}",
     "cluster.memory_per_worker: must be a size such as 16GiB or 500MB or null, got lots"),
    ("cluster: {walltime: 4h}",
     "cluster.walltime: must be a time limit such as 04:00:00 or 1-00:00:00 or null, got 4h"),
    ("cluster: {job_extra_directives: --exclusive}",
     "cluster.job_extra_directives: must be a list of non-empty strings, got --exclusive"),
    ("cluster: {kind: address}",
     "cluster.address: must be set (tcp://host:port) when cluster.kind is address, and only then, got null"),
    ("cluster: {address: 'tcp://h:8786'}",
     "cluster.address: must be set (tcp://host:port) when cluster.kind is address, and only then, got tcp://h:8786"),
    ("cluster: {kind: address, address: 'h:8786'}",
     "cluster.address: must be a scheduler address such as tcp://host:8786 or null, got h:8786"),
    ("cluster: {kind: slurm}",
     "cluster.memory_per_worker: must be set for the jobs of cluster.kind: slurm (a batch system needs it), "
     "got null"),
])
def test_bad_file(tmp_path, snippet, message):
    path = write(tmp_path, snippet + "\n")
    assert error_of(path) == f"{path}: {message}"


def test_rules_that_pass():
    load_config(None, ["background.window=11"])  # stride 50 > window only matters in block mode
    load_config(None, ["dark.url=d.h5::/2.1/measurement/marana"])
    load_config(None, ["segmentation.grow_high=10"])  # grow_low is auto
    load_config(None, ["direct_beam.bbox=[0,0,5,5]", "background.normalise=margin"])


def test_cross_rule_error_names_the_layer_that_broke_it(tmp_path):
    path = write(tmp_path, "background: {normalise: margin}\ndirect_beam: {bbox: [0, 0, 9, 9]}\n")
    assert error_of(path, ["direct_beam.bbox=null"]) == (
        "--set: background.normalise: must be none when direct_beam.bbox is none, got margin"
    )
    path = write(tmp_path, "background: {mode: block, stride: 20}\n")
    assert error_of(path, ["background.window=15"]) == (
        "--set: background.stride: must be <= background.window (15) in block mode, got 20"
    )


@pytest.mark.parametrize(("override", "message"), [
    ("background.window", "--set: expected section.key=value, got background.window"),
    ("=5", "--set: expected section.key=value, got =5"),
    ("background.windw=5",
     "--set: background.windw: unknown key (known: batch_frames, margin_px, mode, normalise, stride, window)"),
    ("bg.window=5",
     "--set: bg: unknown section (known: background, cluster, dark, detector, direct_beam, export, filter, output, "
     "quicklook, segmentation, source, status, watch)"),
    ("background.window=4", "--set: background.window: must be odd and >= 3, got 4"),
    ("dark.value=[1,", "--set: dark.value: invalid YAML value '[1,': "
                       "while parsing a flow node, expected the node content, but found '<stream end>'"),
])
def test_bad_override(tmp_path, override, message):
    assert error_of(write(tmp_path, ""), [override]) == message


def test_override_error_names_set_not_the_file(tmp_path):
    path = write(tmp_path, "background: {window: 11}\n")
    assert error_of(path, ["background.window=12"]).startswith("--set: background.window:")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yml"
    assert error_of(path) == f"{path}: cannot read config file: No such file or directory"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "background:\n  window: 5\n mode: exact\n")
    assert error_of(path) == (
        f"{path}: line 3: invalid YAML: while parsing a block mapping, "
        "expected <block end>, but found '<block mapping start>'"
    )


# -- packaged configs -----------------------------------------------------------


def test_packaged_configs_are_the_shipped_files(capsys):
    from dctstream import configs
    from dctstream.cli import main

    assert configs.names() == sorted(p.stem for p in CONFIGS.glob("*.yml"))
    assert main(["config", "list"]) == 0
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert listed == {p.stem: str(configs.packaged_path(p.stem)) for p in CONFIGS.glob("*.yml")}
    assert main(["config", "show", "sim512"]) == 0
    assert capsys.readouterr().out == (CONFIGS / "sim512.yml").read_text()
    assert main(["config", "show", "nope"]) == 2
    assert capsys.readouterr().err == ("dctstream: error: config show: nope: no such packaged config, expected one "
                                       f"of {', '.join(configs.names())}\n")


def test_a_config_argument_is_a_file_else_a_packaged_name(tmp_path, monkeypatch):
    from dctstream.configs import config_file, packaged_path

    monkeypatch.chdir(tmp_path)
    assert config_file(None) == packaged_path("default")
    assert config_file("sim512") == config_file("sim512.yml") == packaged_path("sim512")
    (tmp_path / "sim512.yml").write_text("background: {window: 11}\n")
    assert config_file("sim512.yml") == "sim512.yml"  # a file of that name wins
    assert config_file("other.yml") == "other.yml"  # neither: reading it says it is missing


def test_batch_frames_auto_slides_large_detectors_sixteen_frames_at_a_time():
    from dctstream.config import frames_per_batch

    assert load_config(None).background.batch_frames == "auto"
    assert frames_per_batch("auto", (512, 512)) == 1
    assert frames_per_batch("auto", (1024, 1024)) == 8
    assert frames_per_batch("auto", (2048, 2048)) == 8
    assert frames_per_batch(4, (2048, 2048)) == 4
    assert load_config(None, ["background.batch_frames=8"]).background.batch_frames == 8
    with pytest.raises(ConfigError, match="background.batch_frames"):
        load_config(None, ["background.batch_frames=0"])
