"""Which unfinished run a new one continues: equal effective settings, or an error naming the first that differs."""

import pytest
import yaml

from dctstream.checkpoint import start_run, unfinished_run
from dctstream.config import config_to_dict, dump_config, load_config, replace_config
from dctstream.errors import OutputError


@pytest.fixture
def started(tmp_path):
    cfg = load_config(None, ["source.url=scan.h5::/1.1/measurement/marana", f"output.dir={tmp_path}"])
    start_run(tmp_path, dump_config(cfg))
    return tmp_path, cfg


def test_no_unfinished_run(tmp_path):
    assert unfinished_run(tmp_path, "anything") is False


def test_the_same_settings_written_another_way_resume(started):
    """Before: the marker had to be byte-equal (a dump of another key order or spacing was another run)."""
    out, cfg = started
    tree = config_to_dict(cfg)
    reordered = {name: dict(reversed(list(keys.items()))) for name, keys in reversed(list(tree.items()))}
    assert unfinished_run(out, yaml.safe_dump(reordered, indent=4, default_flow_style=True)) is True


def test_settings_that_cannot_change_a_result_may_change(started):
    out, cfg = started
    changed = replace_config(cfg, status={"log_every_s": 1.0}, output={"checkpoint_every_frames": 7})
    assert unfinished_run(out, dump_config(changed)) is True


def test_another_setting_is_named(started):
    out, cfg = started
    changed = replace_config(cfg, background={"window": 101})
    with pytest.raises(OutputError, match=r"holds an unfinished run of another configuration "
                                          r"\(background.window: was 501, now 101\), expected the same command"):
        unfinished_run(out, dump_config(changed))
