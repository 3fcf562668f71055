"""The adaptive share of successful anchors (DESIGN step 7, paper section 3.2): `RhoController(cfg.cipo.rho)`."""

from __future__ import annotations

import math
from typing import Any

from cipo_nemo.config.schema import RhoConfig


class RhoController:
    """rho, the share of successful anchors, steered by retention (mean reward of corrections of correct anchors).

    Rules (ret = this step's retention, clip to [min, max] after each update):
    - ``multiplicative`` (paper section 1.3 item 13): rho <- rho * (1 + w_level*f1 + w_drop*f2 + w_streak*f3),
      f1 = tau - ret, f2 = max(0, prev_ret - ret) (0 without a previous retention), f3 = min(k, streak_cap),
      k = consecutive updates with ret < tau including this one (0 when ret >= tau).
    - ``proportional``: rho <- rho + eta * (tau - ret).

    rho rises while retention < tau and falls toward `min` otherwise. `update(None)` (no successful anchor this
    step) changes nothing. The state (rho, previous retention, streak) round-trips through `state_dict`.
    """

    def __init__(self, config: RhoConfig) -> None:
        self.config = config  # validated by the schema (bounds ordered, init inside them)
        self._rho = config.init
        self._prev_retention: float | None = None
        self._streak = 0

    @property
    def rho(self) -> float:
        return self._rho

    def update(self, retention: float | None) -> float:
        """Apply one step's retention (None: no successful anchor, nothing changes); returns the new rho."""
        if retention is None:
            return self._rho
        if not math.isfinite(retention):
            raise ValueError(f"retention must be a finite number or None, got {retention}")
        self._streak = self._streak + 1 if retention < self.config.tau else 0
        if self.config.rule == "multiplicative":
            proposal = self._rho * self._multiplicative_factor(retention)
        else:
            proposal = self._rho + self.config.eta * (self.config.tau - retention)  # rho + eta * (tau - ret)
        self._rho = min(self.config.max, max(self.config.min, proposal))  # clip(., rho_min, rho_max)
        self._prev_retention = float(retention)
        return self._rho

    def _multiplicative_factor(self, retention: float) -> float:
        level = self.config.tau - retention  # f1 = tau - ret
        drop = 0.0 if self._prev_retention is None else max(0.0, self._prev_retention - retention)  # f2
        streak = min(self._streak, self.config.streak_cap)  # f3 = min(k, cap)
        weights = self.config
        return 1.0 + weights.w_level * level + weights.w_drop * drop + weights.w_streak * streak

    def state_dict(self) -> dict[str, float | int | None]:
        return {"rho": self._rho, "prev_retention": self._prev_retention, "streak": self._streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"rho", "prev_retention", "streak"}
        if set(state) != expected:
            raise ValueError(f"RhoController state needs exactly the keys {sorted(expected)}, got {sorted(state)}")
        if not self.config.min <= state["rho"] <= self.config.max:
            raise ValueError(f"saved rho {state['rho']} lies outside [min, max] = [{self.config.min}, {self.config.max}]")
        if not isinstance(state["streak"], int) or state["streak"] < 0:
            raise ValueError(f"saved streak must be an int >= 0, got {state['streak']!r}")
        self._rho = float(state["rho"])
        self._prev_retention = None if state["prev_retention"] is None else float(state["prev_retention"])
        self._streak = state["streak"]
