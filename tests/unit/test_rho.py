"""The rho controller says when it cannot steer (cipo/rho_at_bound, the bound share, one warning) and sets
`tau: auto` from the first measured retention (issue 13 item 2)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from cipo_nemo import __main__ as entry
from cipo_nemo import loop, trainer
from cipo_nemo.algorithms.rho import RhoController
from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.config.schema import RhoConfig

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"

RHO = dict(min=0.2, max=0.8, init=0.3, tau=0.8, tau_margin=0.05, rule="multiplicative",
           w_level=0.8, w_drop=0.3, w_streak=0.05, streak_cap=3, eta=0.5)


def _controller(**overrides) -> RhoController:
    return RhoController(RhoConfig(**(RHO | overrides)))


def _step(controller: RhoController, retention: float | None) -> str | None:
    controller.update(retention)
    return controller.count_step()


# ----- at a bound -------------------------------------------------------------------------------------------------


def test_at_bound_after_the_update() -> None:
    controller = _controller()
    assert not controller.at_bound  # init 0.3 inside [0.2, 0.8]
    # ret 0: 0.3 * (1 + 0.64 + 0.05) = 0.507 (inside); then 0.507 * 1.74 -> clipped to max 0.8
    controller.update(0.0)
    assert controller.rho == pytest.approx(0.507) and not controller.at_bound
    controller.update(0.0)
    assert controller.rho == 0.8 and controller.at_bound
    for _ in range(10):  # ret 1: factor 0.84 per step, 0.8 * 0.84^8 < 0.2: the floor
        controller.update(1.0)
    assert controller.rho == 0.2 and controller.at_bound


def test_bound_share_counts_steps_at_each_bound() -> None:
    controller = _controller(rule="proportional", eta=1.0)
    assert controller.bound_share is None  # nothing counted yet
    _step(controller, None)  # 0.3: inside
    _step(controller, 0.0)  # 0.3 + 0.8 -> 0.8: at max
    _step(controller, 1.0)  # 0.8 - 0.2 = 0.6: inside
    _step(controller, 1.0)  # 0.4
    _step(controller, 1.0)  # 0.2: at min
    state = controller.state_dict()
    assert (state["steps"], state["steps_at_max"], state["steps_at_min"]) == (5, 1, 1)
    assert controller.bound_share == pytest.approx(2 / 5)


def test_the_warning_fires_once_when_more_than_half_of_at_least_10_steps_sit_at_a_bound() -> None:
    controller = _controller(rule="proportional", eta=1.0)
    warnings = [_step(controller, None) for _ in range(5)]  # rho 0.3, inside, 5 steps
    warnings += [_step(controller, 0.0) for _ in range(5)]  # at max: 5 of 10 = exactly one half, not more
    assert warnings == [None] * 10
    eleventh = _step(controller, 0.0)  # 6 of 11 > 1/2
    assert eleventh is not None
    for key in ("cipo.rho.tau", "cipo.rho.max", "cipo.rho.min", "cipo.rho.eta", "cipo.rho.tau_margin"):
        assert key in eleventh, key
    assert "6 of 11 steps" in eleventh and "below tau = 0.8" in eleventh
    assert [_step(controller, 0.0) for _ in range(20)] == [None] * 20  # once


def test_no_warning_below_10_steps_even_when_always_at_a_bound() -> None:
    controller = _controller(init=0.8)  # starts at max; retention 0 keeps it there
    assert [_step(controller, 0.0) for _ in range(9)] == [None] * 9
    tenth = _step(controller, 0.0)
    assert tenth is not None and "10 of 10 steps (100%" in tenth
    assert "cipo.rho.w_level" in tenth  # the multiplicative rule's gain


def test_the_warning_at_the_floor_says_retention_stays_above_tau() -> None:
    controller = _controller(init=0.2)
    message = [_step(controller, 1.0) for _ in range(10)][-1]
    assert message is not None and "above tau" in message and "raise cipo.rho.tau" in message


def test_trainer_reports_rho_at_bound_and_warns_once(caplog) -> None:
    controller = _controller(init=0.8)
    cipo = SimpleNamespace(cfg=SimpleNamespace(cipo=SimpleNamespace(enabled=True)), rho=controller)
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        for _ in range(15):
            trainer.update_rho(cipo, 0.0)
    assert [r.levelno for r in caplog.records if r.name == trainer.__name__] == [logging.WARNING]
    assert trainer.rho_metrics(cipo) == {"cipo/rho_at_bound": 1.0, "cipo/rho_tau": 0.8}
    assert loop.rho_bound_share(cipo) == 1.0
    inside = SimpleNamespace(cfg=cipo.cfg, rho=_controller())
    trainer.update_rho(inside, None)
    assert trainer.rho_metrics(inside)["cipo/rho_at_bound"] == 0.0


def test_grpo_has_the_keys_but_no_values_and_no_warning(caplog) -> None:
    grpo = SimpleNamespace(cfg=SimpleNamespace(cipo=SimpleNamespace(enabled=False)), rho=_controller(init=0.2))
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        for _ in range(15):
            trainer.update_rho(grpo, None)
    assert not caplog.records
    assert trainer.rho_metrics(grpo) == {"cipo/rho_at_bound": None, "cipo/rho_tau": None}
    assert loop.rho_bound_share(grpo) is None


@pytest.mark.parametrize(("share", "line"), [(0.96, "  rho at a bound in 96% of steps\n"), (None, None)])
def test_the_run_summary_prints_the_bound_share(monkeypatch, capsys, tmp_path, share, line) -> None:
    summary = loop.RunSummary(run_dir=Path("run"), steps_done=3, last_metrics={}, plot=None,
                                 rho_at_bound_share=share)
    monkeypatch.setattr(trainer, "setup", lambda cfg, items: None)
    monkeypatch.setattr(loop, "train", lambda components: summary)
    monkeypatch.setattr(trainer, "shutdown", lambda components: None)
    cfg = SimpleNamespace(checkpointing=SimpleNamespace(save_hf_at_end=False),
                          run=SimpleNamespace(output_dir=str(tmp_path)))
    assert entry.run_training(cfg, None) == 0
    printed = capsys.readouterr().out
    assert ("rho at a bound" in printed) == (line is not None)
    if line is not None:
        assert line in printed


# ----- tau: auto ----------------------------------------------------------------------------------------------------


def test_tau_auto_is_set_from_the_first_measured_retention() -> None:
    controller = _controller(tau="auto")
    assert controller.tau is None
    assert controller.update(None) == 0.3 and controller.tau is None  # no retention measured: nothing set
    # tau = min(0.95, 0.5 + 0.05) = 0.55; f1 = 0.05, k = 1: 0.3 * (1 + 0.04 + 0.05) = 0.327
    assert controller.update(0.5) == pytest.approx(0.327)
    assert controller.tau == pytest.approx(0.55)
    # set once: ret 0.9 >= 0.55, f1 = -0.35, k = 0: 0.327 * (1 - 0.28) = 0.23544
    assert controller.update(0.9) == pytest.approx(0.23544)
    assert controller.tau == pytest.approx(0.55)


def test_tau_auto_is_capped_at_095() -> None:
    controller = _controller(tau="auto", tau_margin=0.1)
    controller.update(0.9)
    assert controller.tau == 0.95


def test_state_round_trip_keeps_the_auto_tau() -> None:
    original = _controller(tau="auto")
    for retention in (None, 0.5, 0.4):
        _step(original, retention)
    state = original.state_dict()
    assert state["tau"] == pytest.approx(0.55) and state["steps"] == 3
    restored = _controller(tau="auto")
    restored.load_state_dict(state)
    assert restored.tau == pytest.approx(0.55)
    for retention in (0.7, 0.2, 0.6):  # a fresh auto controller would take tau from 0.7 instead
        assert restored.update(retention) == original.update(retention)
    assert restored.state_dict() == original.state_dict()
    fresh = _controller(tau="auto")
    fresh.update(0.7)
    assert fresh.tau == pytest.approx(0.75)


def test_resume_before_any_retention_keeps_tau_unset_and_a_fixed_tau_comes_from_the_config() -> None:
    unset = _controller(tau="auto")
    unset.load_state_dict(_controller(tau="auto").state_dict())
    assert unset.tau is None
    fixed = _controller(tau=0.7)
    fixed.load_state_dict(_controller(tau="auto").state_dict() | {"tau": 0.55})
    assert fixed.tau == 0.7


@pytest.mark.parametrize(
    ("change", "match"),
    [({"tau": 1.5}, "tau"), ({"steps_at_max": 4, "steps": 3}, "exceed"), ({"steps": -1}, "steps"),
     ({"streak": 1.0}, "streak")],
)
def test_load_state_rejects_bad_values(change: dict, match: str) -> None:
    state = _controller().state_dict() | change
    with pytest.raises(ValueError, match=match):
        _controller().load_state_dict(state)
    legacy = {key: state[key] for key in ("rho", "prev_retention", "streak")}  # a state of the old layout
    with pytest.raises(ValueError, match="keys"):
        _controller().load_state_dict(legacy)


def test_config_accepts_tau_auto_and_keeps_the_paper_default() -> None:
    assert load_config(BASE).cipo.rho.tau == 0.8
    assert load_config(BASE, ["cipo.rho.tau=auto", "cipo.rho.tau_margin=0.1"]).cipo.rho.tau == "auto"
    assert load_config(BASE, ["cipo.rho.tau=1"]).cipo.rho.tau == 1.0  # an int is a probability too


@pytest.mark.parametrize("value", ["1.5", "-0.1", "automatic", "true", "null", ".nan"])
def test_config_rejects_a_bad_tau(value: str) -> None:
    with pytest.raises(ConfigError, match=r"cipo\.rho\.tau: must be a probability in \[0, 1\] or 'auto'"):
        load_config(BASE, [f"cipo.rho.tau={value}"])


def test_config_rejects_a_negative_tau_margin() -> None:
    with pytest.raises(ConfigError, match="cipo.rho.tau_margin: Input should be greater than or equal to 0"):
        load_config(BASE, ["cipo.rho.tau_margin=-0.05"])
