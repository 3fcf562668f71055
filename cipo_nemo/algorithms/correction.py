"""The correction stream of CIPO (DESIGN steps 2, 3, 5 and 7).

- `select_anchors`: difficulty-aware choice of the rollouts to be corrected, a share rho of them successful.
- `strip_thinking`, `truncate_left`, `build_correction_prompt`: the text of a correction prompt (user message;
  chat templating happens elsewhere). The verifier's verdict is never shown to the policy.
- `shape_correction_rewards`: risk-averse shaping, r~ = r - lambda_risk * 1[anchor correct and correction wrong].
- `RhoController`: the adaptive share of successful anchors, driven by retention (right -> right rate).
- `build_training_batch`: one training batch from a step's base and correction rollouts, plus metrics.

Config: ``cipo.*`` (`CorrectionConfig`); ``RhoController(**cfg.cipo.rho.model_dump())`` builds the controller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from cipo_nemo.data.batch import Batch

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
SUCCESS_THRESHOLD = 0.5  # a rollout is successful when its reward > 0.5 (rewards are in {0, 1})
TRUNCATION_MARKER = "..."
RHO_RULES = ("multiplicative", "proportional")


# ----- anchor selection (DESIGN step 2) -------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorSelection:
    """The anchors of one step.

    `indices` index the base samples; successful anchors come first, then failed ones, each kind in the order
    it was drawn. `anchor_correct[i]` and `in_window[i]` describe `indices[i]`. `prompt_accuracy` maps every
    group id of the base batch to its accuracy p (mean reward).
    """

    indices: list[int]
    anchor_correct: list[bool]
    in_window: list[bool]
    prompt_accuracy: dict[int, float]

    def __post_init__(self) -> None:
        if not len(self.indices) == len(self.anchor_correct) == len(self.in_window):
            raise ValueError(
                f"AnchorSelection lists differ in length: indices {len(self.indices)}, "
                f"anchor_correct {len(self.anchor_correct)}, in_window {len(self.in_window)}"
            )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_successful(self) -> int:
        return sum(self.anchor_correct)

    @property
    def num_failed(self) -> int:
        return len(self.indices) - self.num_successful

    @property
    def num_in_window(self) -> int:
        return sum(self.in_window)

    @property
    def num_fallback(self) -> int:
        """Anchors taken from prompts outside [p_low, p_high]."""
        return len(self.indices) - self.num_in_window


def select_anchors(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    rho: float,
    max_anchors: int,
    p_low: float,
    p_high: float,
    allow_out_of_window: bool,
    generator: torch.Generator,
) -> AnchorSelection:
    """Choose up to `max_anchors` base rollouts to be corrected, a share `rho` of them successful.

    Counts: n_success = floor(rho * max_anchors + 0.5) (round half up, not Python's banker's rounding),
    n_failed = max_anchors - n_success. Each kind is taken *as available*: when there are fewer successful
    (or failed) rollouts than asked, the shortfall is not filled with the other kind, so that rho keeps its
    meaning as the share of successful anchors asked for, and fewer than `max_anchors` anchors may result.

    Candidates of one kind come in tiers: first rollouts of in-window prompts (p_low <= p <= p_high, p = mean
    reward of the prompt's group), then, only with `allow_out_of_window`, rollouts of the other prompts.
    Inside a tier the anchors are spread over prompts: each round visits the prompts that still hold
    candidates in a random order and takes one random rollout from each, until the count is reached.

    Randomness comes only from `generator` (successful anchors are drawn before failed ones), so the result
    is a function of the inputs and the generator's state.
    """
    _validate_anchor_args(rewards, group_ids, rho=rho, max_anchors=max_anchors, p_low=p_low, p_high=p_high)
    reward_list = [float(r) for r in rewards.tolist()]
    group_list = [int(g) for g in group_ids.tolist()]
    accuracy = _prompt_accuracy(reward_list, group_list)
    in_window_prompt = {group: p_low <= p <= p_high for group, p in accuracy.items()}
    num_successful = math.floor(rho * max_anchors + 0.5)  # n_s = floor(rho * N + 0.5)
    indices: list[int] = []
    for successful, quota in ((True, num_successful), (False, max_anchors - num_successful)):
        for window_tier in (True, False) if allow_out_of_window else (True,):  # in-window prompts first
            tier = [
                i
                for i, reward in enumerate(reward_list)
                if (reward > SUCCESS_THRESHOLD) == successful and in_window_prompt[group_list[i]] == window_tier
            ]
            picked = _spread_over_prompts(tier, group_list, quota=quota, generator=generator)
            indices += picked
            quota -= len(picked)  # a shortfall moves to the next tier of the same kind, never to the other kind
    return AnchorSelection(
        indices=indices,
        anchor_correct=[reward_list[i] > SUCCESS_THRESHOLD for i in indices],
        in_window=[in_window_prompt[group_list[i]] for i in indices],
        prompt_accuracy=accuracy,
    )


def _prompt_accuracy(rewards: list[float], group_ids: list[int]) -> dict[int, float]:
    totals: dict[int, list[float]] = {}
    for reward, group in zip(rewards, group_ids):
        totals.setdefault(group, []).append(reward)
    return {group: sum(values) / len(values) for group, values in sorted(totals.items())}  # p = mean r


def _spread_over_prompts(
    candidates: list[int], group_ids: list[int], *, quota: int, generator: torch.Generator
) -> list[int]:
    """Up to `quota` candidates, at most one per prompt per round, prompts visited in a random order."""
    if quota <= 0 or not candidates:
        return []
    by_prompt: dict[int, list[int]] = {}
    for index in candidates:
        by_prompt.setdefault(group_ids[index], []).append(index)
    queues = {group: _shuffled(members, generator) for group, members in sorted(by_prompt.items())}
    taken: list[int] = []
    while queues and len(taken) < quota:
        prompts = sorted(queues)
        for position in torch.randperm(len(prompts), generator=generator).tolist():
            if len(taken) == quota:
                break
            queue = queues[prompts[position]]
            taken.append(queue.pop())
            if not queue:
                del queues[prompts[position]]
    return taken


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def _validate_anchor_args(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, rho: float, max_anchors: int, p_low: float, p_high: float
) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (N,), got {_shape_of(rewards)}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"group_ids must be an integer tensor, got {_shape_of(group_ids)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, rewards {tuple(rewards.shape)}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    if isinstance(max_anchors, bool) or not isinstance(max_anchors, int) or max_anchors < 0:
        raise ValueError(f"max_anchors must be an int >= 0, got {max_anchors!r}")
    if not 0.0 <= p_low <= p_high <= 1.0:
        raise ValueError(f"need 0 <= p_low <= p_high <= 1, got p_low={p_low}, p_high={p_high}")


def _shape_of(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


# ----- correction prompt text (DESIGN step 3) ----------------------------------------------------------------


class _Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class _Templates(Protocol):
    math: str
    code: str


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
# a fenced block: ``` + optional info string + newline, up to the closing ``` (or the end: a cut-off response)
_CODE_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{(problem|attempt|language)\}")


def strip_thinking(text: str) -> str:
    """Remove the reasoning part of a response and strip surrounding whitespace.

    In this order: every complete ``<think>...</think>`` block; then, if a ``</think>`` is left (Qwen3-style
    responses whose opening tag sits in the prompt), everything up to and including the last one; then, if a
    ``<think>`` is left (a response cut off while thinking), everything from it to the end.
    """
    text = _THINK_BLOCK.sub("", text)
    if _THINK_CLOSE in text:
        text = text.rsplit(_THINK_CLOSE, 1)[1]
    if _THINK_OPEN in text:
        text = text.split(_THINK_OPEN, 1)[0]
    return text.strip()


def truncate_left(text: str, *, tokenizer: _Tokenizer, max_tokens: int) -> str:
    """Keep the end of `text` (where the final answer lives) within a budget of `max_tokens` tokens.

    Unchanged when `text` encodes to at most `max_tokens` tokens. Otherwise the result is ``"..."`` followed by
    the longest tail of `text` that starts at a token boundary, such that the *whole result, marker
    included*, encodes to at most `max_tokens` tokens (no special tokens). When the budget is too small to
    hold the marker and one token of text, the tail is returned without the marker. The tail is cut from the
    original string (never decoded), so a multi-byte character is kept whole or dropped whole.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    num_tokens = len(encoding["input_ids"])
    if num_tokens <= max_tokens:
        return text
    # tail_starts[k] = char position where the last k tokens begin (the end of the last dropped token)
    tail_starts = {keep: encoding["offset_mapping"][num_tokens - keep - 1][1] for keep in range(1, max_tokens + 1)}
    for prefix in (TRUNCATION_MARKER, ""):
        for keep in range(max_tokens, 0, -1):
            candidate = prefix + text[tail_starts[keep] :]
            if _count_tokens(candidate, tokenizer) <= max_tokens:
                return candidate
    return ""


def _count_tokens(text: str, tokenizer: _Tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def extract_last_code_block(text: str) -> str:
    """The body of the last fenced code block (a final unclosed fence counts), else the whole text."""
    blocks = _CODE_FENCE.findall(text)
    if not blocks:
        return text
    return blocks[-1].rstrip("\n")


def build_correction_prompt(
    *,
    problem: str,
    attempt: str,
    family: Literal["math", "code"],
    templates: _Templates,
    tokenizer: _Tokenizer,
    attempt_max_tokens: int,
    strip_think: bool,
    language: str = "python",
) -> str:
    """The user message of a correction prompt: the family's template with the problem and the attempt.

    The attempt is prepared as: thinking removed (when `strip_think`), for code the last fenced code block
    (else the whole text), surrounding blank lines removed, then `truncate_left` to `attempt_max_tokens`.
    ``{problem}``, ``{attempt}`` and ``{language}`` are replaced literally in one pass, so other braces (LaTeX's
    ``\\boxed{}``) stay as written and placeholder-like text inside the problem or attempt is not substituted.
    Nothing about the verifier's verdict on the attempt is added.
    """
    if family not in ("math", "code"):
        raise ValueError(f"family must be 'math' or 'code', got {family!r}")
    template = getattr(templates, family)
    quoted = strip_thinking(attempt) if strip_think else attempt
    if family == "code":
        quoted = extract_last_code_block(quoted)
    quoted = truncate_left(quoted.strip("\n"), tokenizer=tokenizer, max_tokens=attempt_max_tokens)
    values = {"problem": problem, "attempt": quoted, "language": language}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


# ----- risk-averse shaping (DESIGN step 5) -------------------------------------------------------------------


def shape_correction_rewards(rewards: torch.Tensor, anchor_correct: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize breaking a correct anchor: r~ = r - penalty * 1[anchor correct and r not successful]; a new tensor.

    "Correct" and "wrong" use the one SUCCESS_THRESHOLD that anchor selection uses (reward > 0.5 is a success),
    so that a partial reward is never counted as success for the anchor and as failure for the correction."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D floating tensor (N,), got {_shape_of(rewards)}")
    if not isinstance(anchor_correct, torch.Tensor) or anchor_correct.shape != rewards.shape:
        expected = tuple(rewards.shape)
        raise ValueError(f"anchor_correct must be a tensor of shape {expected}, got {_shape_of(anchor_correct)}")
    if not math.isfinite(penalty) or penalty < 0:
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")
    broken = anchor_correct.to(torch.bool) & (rewards <= SUCCESS_THRESHOLD)
    return rewards - penalty * broken.to(rewards.dtype)  # r~ = r - lambda_risk * 1[correct anchor, wrong correction]


# ----- adaptive share of successful anchors (DESIGN step 7) -------------------------------------------------


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

    def __init__(
        self,
        *,
        min: float,  # noqa: A002 - named like the config key so that RhoController(**RhoConfig) works
        max: float,  # noqa: A002
        init: float,
        tau: float,
        rule: Literal["multiplicative", "proportional"],
        w_level: float,
        w_drop: float,
        w_streak: float,
        streak_cap: int,
        eta: float,
    ) -> None:
        _validate_rho_args(min, max, init, tau, rule, w_level, w_drop, w_streak, streak_cap, eta)
        self.min, self.max, self.tau, self.rule = float(min), float(max), float(tau), rule
        self.w_level, self.w_drop, self.w_streak = float(w_level), float(w_drop), float(w_streak)
        self.streak_cap, self.eta = streak_cap, float(eta)
        self._rho = float(init)
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
        self._streak = self._streak + 1 if retention < self.tau else 0
        if self.rule == "multiplicative":
            proposal = self._rho * self._multiplicative_factor(retention)
        else:
            proposal = self._rho + self.eta * (self.tau - retention)  # rho + eta * (tau - ret)
        self._rho = min(self.max, max(self.min, proposal))  # clip(., rho_min, rho_max)
        self._prev_retention = float(retention)
        return self._rho

    def _multiplicative_factor(self, retention: float) -> float:
        level = self.tau - retention  # f1 = tau - ret
        drop = 0.0 if self._prev_retention is None else max(0.0, self._prev_retention - retention)  # f2
        streak = min(self._streak, self.streak_cap)  # f3 = min(k, cap)
        return 1.0 + self.w_level * level + self.w_drop * drop + self.w_streak * streak

    def state_dict(self) -> dict[str, float | int | None]:
        return {"rho": self._rho, "prev_retention": self._prev_retention, "streak": self._streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"rho", "prev_retention", "streak"}
        if set(state) != expected:
            raise ValueError(f"RhoController state needs exactly the keys {sorted(expected)}, got {sorted(state)}")
        if not self.min <= state["rho"] <= self.max:
            raise ValueError(f"saved rho {state['rho']} lies outside [min, max] = [{self.min}, {self.max}]")
        if not isinstance(state["streak"], int) or state["streak"] < 0:
            raise ValueError(f"saved streak must be an int >= 0, got {state['streak']!r}")
        self._rho = float(state["rho"])
        self._prev_retention = None if state["prev_retention"] is None else float(state["prev_retention"])
        self._streak = state["streak"]


def _validate_rho_args(
    low: float,
    high: float,
    init: float,
    tau: float,
    rule: str,
    w_level: float,
    w_drop: float,
    w_streak: float,
    streak_cap: int,
    eta: float,
) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= min <= max <= 1, got min={low}, max={high}")
    if not low <= init <= high:
        raise ValueError(f"init must lie in [min, max] = [{low}, {high}], got {init}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if rule not in RHO_RULES:
        raise ValueError(f"rule must be one of {RHO_RULES}, got {rule!r}")
    for name, weight in (("w_level", w_level), ("w_drop", w_drop), ("w_streak", w_streak), ("eta", eta)):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
    if isinstance(streak_cap, bool) or not isinstance(streak_cap, int) or streak_cap < 0:
        raise ValueError(f"streak_cap must be an int >= 0, got {streak_cap!r}")


# ----- the joint training batch -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorrectionMetrics:
    """Per-step correction-stream metrics. Rates are None when nothing was there to measure.

    correction_success: mean raw reward of corrections of failed anchors (wrong -> right).
    retention: mean raw reward of corrections of successful anchors (right -> right); feeds `RhoController`.
    """

    anchors_total: int
    anchors_successful: int
    anchors_failed: int
    anchors_in_window: int
    anchors_fallback: int
    correction_samples: int
    correction_reward_mean: float | None
    correction_success: float | None
    retention: float | None
    rho: float

    def as_dict(self, prefix: str = "cipo/") -> dict[str, float | None]:
        """Metric name -> value for loggers; a rate with nothing to measure stays None (logged as null), so every
        step has the same keys."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {f"{prefix}{name}": None if value is None else float(value) for name, value in values.items()}


def build_training_batch(
    base: Batch,
    corrections: Batch | None,
    *,
    anchors: AnchorSelection | None,
    rho: float,
    risk_penalty: float,
) -> tuple[Batch, CorrectionMetrics]:
    """Join a step's base rollouts and correction rollouts into one training batch.

    `base`: ``sample_kind`` all "base", verifier ``rewards``. `corrections` (None for GRPO or a step without
    anchors): ``sample_kind`` all "correction", verifier ``rewards``, local ``group_id`` (one group per
    correction prompt) and ``anchor_index`` (position in ``anchors.indices`` of the anchor it corrects).

    The result holds every sample with ``raw_rewards`` (verifier rewards), ``rewards`` (base: unchanged;
    corrections: shaped by `shape_correction_rewards` with `risk_penalty`) and ``anchor_index`` (long; -1 for
    base samples, also without corrections, so GRPO and CIPO batches have the same keys). Correction group ids
    are shifted to max(base id) + 1 + local id, disjoint from the base ids. Token tensors of different length
    T are right-padded by `Batch.concat` (masks with False, so the padding is never trained). `rho` is the
    share used to select this step's anchors; it is only reported.
    """
    _validate_base(base)
    base = _with_raw_rewards(base)
    base["anchor_index"] = torch.full((len(base),), -1, dtype=torch.long, device=base["group_id"].device)
    if corrections is None:
        return base, _metrics(anchors, None, None, rho)
    if anchors is None:
        raise ValueError("corrections were given without the AnchorSelection they correct (anchors=None)")
    _validate_corrections(corrections, num_anchors=len(anchors))
    anchor_index = corrections["anchor_index"].long()
    anchor_correct = torch.tensor(anchors.anchor_correct, dtype=torch.bool, device=anchor_index.device)[anchor_index]
    shaped = _shift_and_shape(corrections, base, anchor_correct, risk_penalty)
    merged = Batch.concat([base, shaped])
    return merged, _metrics(anchors, corrections["rewards"], anchor_correct, rho)


def _with_raw_rewards(batch: Batch) -> Batch:
    copied = Batch(dict(batch.items()))  # a shallow copy: the caller's batch keeps its keys
    copied["raw_rewards"] = batch["rewards"].clone()
    return copied


def _shift_and_shape(
    corrections: Batch, base: Batch, anchor_correct: torch.Tensor, risk_penalty: float
) -> Batch:
    shaped = _with_raw_rewards(corrections)
    offset = int(base["group_id"].max().item()) + 1 if len(base) else 0  # new id = max base id + 1 + local id
    shaped["group_id"] = (corrections["group_id"] + offset).to(base["group_id"].dtype)
    shaped["anchor_index"] = corrections["anchor_index"].long()
    shaped["rewards"] = shape_correction_rewards(corrections["rewards"], anchor_correct, risk_penalty)
    return shaped


def _metrics(
    anchors: AnchorSelection | None,
    correction_rewards: torch.Tensor | None,
    anchor_correct: torch.Tensor | None,
    rho: float,
) -> CorrectionMetrics:
    anchors = anchors or AnchorSelection(indices=[], anchor_correct=[], in_window=[], prompt_accuracy={})
    has_corrections = correction_rewards is not None and anchor_correct is not None
    return CorrectionMetrics(
        anchors_total=len(anchors),
        anchors_successful=anchors.num_successful,
        anchors_failed=anchors.num_failed,
        anchors_in_window=anchors.num_in_window,
        anchors_fallback=anchors.num_fallback,
        correction_samples=len(correction_rewards) if has_corrections else 0,
        correction_reward_mean=_mean_or_none(correction_rewards) if has_corrections else None,
        correction_success=_mean_or_none(correction_rewards[~anchor_correct]) if has_corrections else None,
        retention=_mean_or_none(correction_rewards[anchor_correct]) if has_corrections else None,
        rho=float(rho),
    )


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.double().mean().item()) if values.numel() else None


def _validate_base(base: Batch) -> None:
    if "rewards" not in base:
        raise ValueError(f"the base batch needs 'rewards'; keys: {list(base.keys())}")
    kinds = sorted(set(base["sample_kind"]) - {"base"})
    if kinds:
        raise ValueError(f"the base batch holds samples of kind {kinds}; every sample_kind must be 'base'")


def _validate_corrections(corrections: Batch, *, num_anchors: int) -> None:
    missing = [key for key in ("rewards", "anchor_index") if key not in corrections]
    if missing:
        raise ValueError(f"the correction batch lacks {missing}; keys: {list(corrections.keys())}")
    kinds = sorted(set(corrections["sample_kind"]) - {"correction"})
    if kinds:
        raise ValueError(f"the correction batch holds samples of kind {kinds}; every sample_kind must be 'correction'")
    anchor_index = corrections["anchor_index"]
    if not isinstance(anchor_index, torch.Tensor) or anchor_index.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"anchor_index must be an integer tensor, got {_shape_of(anchor_index)}")
    out_of_range = sorted({i for i in anchor_index.tolist() if not 0 <= i < num_anchors})
    if out_of_range:
        raise ValueError(f"anchor_index values {out_of_range} are out of range for {num_anchors} anchors")
    if len(corrections) and int(corrections["group_id"].min().item()) < 0:
        raise ValueError("correction group ids must be local ids >= 0 (one group per correction prompt)")
    for group, members in corrections.group_indices().items():
        if len({anchor_index[i].item() for i in members}) > 1:
            raise ValueError(f"correction group {group} mixes samples of different anchors; one group per anchor")
