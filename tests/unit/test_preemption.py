"""Stopping early on purpose: the signal handlers, the checkpoint_must_save_by duration and its decision rule, and
stop_after_step's."""

import os
import signal
from types import SimpleNamespace

import pytest

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.config.durations import parse_duration
from cipo_nemo.loop import part_ends
from cipo_nemo.utils.preemption import (
    STOP_REQUEST,
    driver_uptime_s,
    next_step_crosses,
    stop_handlers,
)

BASE = "conf/cipo_base.yaml"


@pytest.mark.parametrize(("text", "seconds"), [
    ("00:00:00:01", 1), ("01:30:00", 5400), ("1:02:03:04", 93784), ("00:03:50:00", 13800), ("100:00:00", 360000),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "1:30", "01:61:00", "00:00:60", "1:2:3:4:5", "1h", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_next_step_crosses_counts_the_step_and_the_save():
    assert not next_step_crosses(elapsed_s=100, step_s=30, save_s=10, limit_s=140)
    assert next_step_crosses(elapsed_s=100, step_s=30, save_s=10.5, limit_s=140)
    assert next_step_crosses(elapsed_s=150, step_s=0, save_s=0, limit_s=140)


def test_driver_uptime_is_the_process_age():
    assert 0 < driver_uptime_s() < 24 * 3600


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_request_instead_of_killing(signum):
    before = signal.getsignal(signum)
    with stop_handlers() as stop:
        assert stop.reason is None
        os.kill(os.getpid(), signum)  # Python runs the handler at the next bytecode boundary
        assert stop.reason == f"signal {signum.name}"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.reason == f"signal {signum.name}"  # the first reason is kept
        stop.clear()
    assert signal.getsignal(signum) is before
    assert STOP_REQUEST.reason is None


def test_config_key_validates_the_duration():
    cfg = load_config(BASE, ["checkpointing.checkpoint_must_save_by=00:03:50:00"])
    assert cfg.checkpointing.checkpoint_must_save_by == "00:03:50:00"
    assert load_config(BASE, []).checkpointing.checkpoint_must_save_by is None
    with pytest.raises(ConfigError, match="checkpoint_must_save_by"):
        load_config(BASE, ["checkpointing.checkpoint_must_save_by=3h"])


def test_unquoted_yaml_duration_is_explained(tmp_path):
    # YAML 1.1 reads 1:30:00 as the base-60 integer 5400; the error must say to quote it.
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"defaults: {os.path.abspath(BASE)}\ncheckpointing:\n  checkpoint_must_save_by: 1:30:00\n")
    with pytest.raises(ConfigError, match="quoted string"):
        load_config(preset, [])


def test_stop_after_step_ends_the_part_at_its_step() -> None:
    def c(last):
        return SimpleNamespace(cfg=SimpleNamespace(checkpointing=SimpleNamespace(stop_after_step=last)))

    assert part_ends(c(None), 50) is None and part_ends(c(50), 49) is None
    assert part_ends(c(50), 50) == "stop_after_step 50" and part_ends(c(50), 51) == "stop_after_step 50"
