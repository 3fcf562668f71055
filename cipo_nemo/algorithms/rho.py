"""The adaptive share of successful anchors (docs/design.md step 7, paper 3.2): `RhoController(cfg.cipo.rho)`."""

from __future__ import annotations

import logging
import math
from typing import Any

from cipo_nemo.config.schema import RhoConfig

logger = logging.getLogger(__name__)

AUTO_TAU_CAP = 0.95  # tau: auto never asks for more than 95% retention
BOUND_WARNING_MIN_STEPS = 10  # the bound share is judged only over at least this many steps
BOUND_WARNING_SHARE = 0.5  # ... and warned about when rho sat at a bound in more than this share of them
BOUND_TOLERANCE = 1e-9  # 0.8 - 3 * 0.2 lands 1e-16 above 0.2: that is at the bound, not inside
STATE_KEYS = frozenset({"rho", "prev_retention", "streak", "tau", "steps", "steps_at_min", "steps_at_max"})


class RhoController:
    """rho, the share of successful anchors, steered by retention (mean reward of corrections of correct anchors).

    Rules (ret = this step's retention, clip to [min, max] after each update):
    - ``multiplicative`` (paper section 1.3 item 13): rho <- rho * (1 + w_level*f1 + w_drop*f2 + w_streak*f3),
      f1 = tau - ret, f2 = max(0, prev_ret - ret) (0 without a previous retention), f3 = min(k, streak_cap),
      k = consecutive updates with ret < tau including this one (0 when ret >= tau).
    - ``proportional``: rho <- rho + eta * (tau - ret).

    rho rises while retention < tau and falls toward `min` otherwise. `update(None)` (no successful anchor this
    step) changes nothing. With ``tau: auto`` tau is unset until the first retention that `update` sees, then
    tau = min(0.95, retention + tau_margin) for good.

    A controller pinned at a bound does not steer: `count_step` tallies, once per training step, whether rho sits
    at `min` or `max`, and returns one warning per controller when that happened in more than half of at least
    10 steps. The state (rho, previous retention, streak, tau, the tally) round-trips through `state_dict`.
    """

    def __init__(self, config: RhoConfig) -> None:
        self.config = config  # validated by the schema (bounds ordered, init inside them)
        self._rho = config.init
        self._prev_retention: float | None = None
        self._streak = 0
        self._tau: float | None = None if config.tau == "auto" else config.tau
        self._steps = 0
        self._steps_at_min = 0
        self._steps_at_max = 0
        self._warned = False  # per controller (per process), not saved: a resumed run may warn once more

    @property
    def rho(self) -> float:
        return self._rho

    @property
    def tau(self) -> float | None:
        """The retention target in use; None while `tau: auto` has not seen a retention yet."""
        return self._tau

    @property
    def at_bound(self) -> bool:
        """rho sits at rho.min or rho.max (after the latest update)."""
        return self._at_min() or self._at_max()

    def _at_min(self) -> bool:
        return self._rho <= self.config.min + BOUND_TOLERANCE

    def _at_max(self) -> bool:
        return self._rho >= self.config.max - BOUND_TOLERANCE

    @property
    def bound_share(self) -> float | None:
        """Share of the counted steps in which rho sat at a bound; None before the first counted step."""
        return (self._steps_at_min + self._steps_at_max) / self._steps if self._steps else None

    def update(self, retention: float | None) -> float:
        """Apply one step's retention (None: no successful anchor, nothing changes); returns the new rho."""
        if retention is None:
            return self._rho
        if not math.isfinite(retention):
            raise ValueError(f"retention must be a finite number or None, got {retention}")
        tau = self._tau if self._tau is not None else self._set_auto_tau(retention)
        self._streak = self._streak + 1 if retention < tau else 0
        if self.config.rule == "multiplicative":
            proposal = self._rho * self._multiplicative_factor(retention, tau)
        else:
            proposal = self._rho + self.config.eta * (tau - retention)  # rho + eta * (tau - ret)
        self._rho = min(self.config.max, max(self.config.min, proposal))  # clip(., rho_min, rho_max)
        self._prev_retention = float(retention)
        return self._rho

    def _set_auto_tau(self, retention: float) -> float:
        self._tau = min(AUTO_TAU_CAP, float(retention) + self.config.tau_margin)  # tau = min(0.95, ret_1 + margin)
        logger.info("cipo.rho.tau auto: tau = %.4f (first measured retention %.4f + tau_margin %g, at most %g)",
                    self._tau, retention, self.config.tau_margin, AUTO_TAU_CAP)
        return self._tau

    def _multiplicative_factor(self, retention: float, tau: float) -> float:
        level = tau - retention  # f1 = tau - ret
        drop = 0.0 if self._prev_retention is None else max(0.0, self._prev_retention - retention)  # f2
        streak = min(self._streak, self.config.streak_cap)  # f3 = min(k, cap)
        weights = self.config
        return 1.0 + weights.w_level * level + weights.w_drop * drop + weights.w_streak * streak

    def count_step(self) -> str | None:
        """Tally where rho sits after this step's update; the bound warning the first time it is due, else None."""
        self._steps += 1
        if self._at_max():
            self._steps_at_max += 1
        elif self._at_min():
            self._steps_at_min += 1
        share = self.bound_share
        if self._warned or self._steps < BOUND_WARNING_MIN_STEPS or share is None or share <= BOUND_WARNING_SHARE:
            return None
        self._warned = True
        return self._bound_warning(share)

    def _bound_warning(self, share: float) -> str:
        config = self.config
        tau = "not yet set (auto)" if self._tau is None else f"{self._tau:.3g}"
        counts = (f"rho sat at a bound in {self._steps_at_min + self._steps_at_max} of {self._steps} steps "
                  f"({share:.0%}: at cipo.rho.max = {config.max} in {self._steps_at_max}, at cipo.rho.min = "
                  f"{config.min} in {self._steps_at_min}), so the controller cannot steer the anchor mix.")
        gain = "the gain cipo.rho.w_level (and w_streak)" if config.rule == "multiplicative" else "the gain cipo.rho.eta"
        if self._steps_at_max >= self._steps_at_min:
            advice = (f"Retention stays below tau = {tau}: lower cipo.rho.tau or set cipo.rho.tau=auto (with "
                      f"cipo.rho.tau_margin), raise cipo.rho.max, or lower {gain}.")
        else:
            advice = (f"Retention stays above tau = {tau}: raise cipo.rho.tau, lower cipo.rho.min, "
                      f"or lower {gain}.")
        return f"{counts} {advice}"

    def state_dict(self) -> dict[str, float | int | None]:
        return {"rho": self._rho, "prev_retention": self._prev_retention, "streak": self._streak, "tau": self._tau,
                "steps": self._steps, "steps_at_min": self._steps_at_min, "steps_at_max": self._steps_at_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state. A fixed tau comes from the config (it may have been changed on purpose); with
        `tau: auto` the saved tau is kept, so a resumed run steers toward the same target."""
        if set(state) != STATE_KEYS:
            raise ValueError(f"RhoController state needs exactly the keys {sorted(STATE_KEYS)}, got {sorted(state)}")
        if not self.config.min <= state["rho"] <= self.config.max:
            raise ValueError(f"saved rho {state['rho']} lies outside [min, max] = [{self.config.min}, {self.config.max}]")
        for key in ("streak", "steps", "steps_at_min", "steps_at_max"):
            if not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"saved {key} must be an int >= 0, got {state[key]!r}")
        if state["steps_at_min"] + state["steps_at_max"] > state["steps"]:
            raise ValueError(f"saved steps at a bound ({state['steps_at_min']} + {state['steps_at_max']}) exceed "
                             f"the steps counted ({state['steps']})")
        if state["tau"] is not None and not 0.0 <= state["tau"] <= 1.0:
            raise ValueError(f"saved tau must be None or lie in [0, 1], got {state['tau']!r}")
        self._rho = float(state["rho"])
        self._prev_retention = None if state["prev_retention"] is None else float(state["prev_retention"])
        self._streak = state["streak"]
        if self.config.tau == "auto":
            self._tau = None if state["tau"] is None else float(state["tau"])
        self._steps, self._steps_at_min, self._steps_at_max = state["steps"], state["steps_at_min"], state["steps_at_max"]
