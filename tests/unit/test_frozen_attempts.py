"""cipo.anchor_source frozen_start: the correction prompts quote the start model's attempts with the anchor's verdict,
the file is checked line by line, and the config and the preflight refuse an incomplete or wrong setting."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cipo_nemo.algorithms.anchors import AnchorSelection
from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.data.frozen_attempts import coverage, load_frozen_attempts
from cipo_nemo.data.sources import DataError, TaskItem
from cipo_nemo.models.interfaces import SampledResponse
from cipo_nemo.models.rollout import responses_to_batch
from cipo_nemo.models.tiny import build_tiny_tokenizer
from cipo_nemo.preflight import check_frozen_attempts
from cipo_nemo.trainer import correction_rollout
from cipo_nemo.utils.progress import StepProgress

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _attempts_file(tmp_path: Path) -> str:
    return _write(tmp_path / "frozen.jsonl", [
        {"id": "a", "responses": ["START WRONG a1", "START RIGHT a", "START WRONG a2"], "rewards": [0.0, 1.0, 0.0],
         "prompt": "ignored"},
        {"id": "b", "responses": ["START RIGHT b"], "rewards": [1.0]},
    ])


def _items() -> list[TaskItem]:
    return [TaskItem(id=name, family="math", prompt=f"What is {name}?", messages=None, answer="1", origin=name,
                     metadata={}) for name in ("a", "b")]


def test_each_anchor_quotes_a_start_attempt_with_its_verdict(tmp_path: Path) -> None:
    frozen = load_frozen_attempts(_attempts_file(tmp_path), is_success=is_success)
    quoted = frozen.quote(["a", "a", "b", "b", "missing"], [True, False, True, False, False], seed=7)
    assert quoted[0] == "START RIGHT a" and quoted[1] in ("START WRONG a1", "START WRONG a2")
    assert quoted[2] == "START RIGHT b"
    assert quoted[3] is None and quoted[4] is None  # b has no wrong attempt; "missing" none at all
    assert frozen.quote(["a", "a", "b", "b", "missing"], [True, False, True, False, False], seed=7) == quoted
    draws = {frozen.quote(["a"], [False], seed=seed)[0] for seed in range(40)}
    assert draws == {"START WRONG a1", "START WRONG a2"}  # uniform over the right kind, not always the first
    assert coverage(frozen, ["a", "b", "c"]) == {"items": 3, "in_file": 2, "with_right": 2, "with_wrong": 1,
                                                  "with_both": 1}


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "frozen.jsonl:2: not JSON"),
    ('{"id": "c", "responses": ["x"], "rewards": [1.0, 0.0]}', "frozen.jsonl:2: 'rewards' must be a list of numbers"),
    ('{"id": "c", "responses": "x", "rewards": [1.0]}', "frozen.jsonl:2: 'responses' must be a list of strings"),
    ('{"id": "", "responses": [], "rewards": []}', "frozen.jsonl:2: 'id' must be a non-empty string"),
    ('{"id": "a", "responses": [], "rewards": []}', "frozen.jsonl:2: item id 'a' given twice"),
])
def test_a_bad_line_is_one_error_naming_the_key_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "frozen.jsonl"
    path.write_text(json.dumps({"id": "a", "responses": ["x"], "rewards": [1.0]}) + "\n" + line + "\n")
    with pytest.raises(DataError, match="cipo.frozen_attempts: .*" + message.replace("(", r"\(")):
        load_frozen_attempts(str(path), is_success=is_success)


def test_a_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cipo.frozen_attempts: .*nowhere.jsonl is not a file"):
        load_frozen_attempts(str(tmp_path / "nowhere.jsonl"), is_success=is_success)


def test_the_config_refuses_frozen_start_without_attempts_and_attempts_without_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frozen_start needs the start model's attempts"):
        load_config(BASE, ["cipo.anchor_source=frozen_start"])
    with pytest.raises(ConfigError, match="is read only with anchor_source frozen_start"):
        load_config(BASE, ["cipo.frozen_attempts=/tmp/x.jsonl"])
    cfg = load_config(BASE, ["cipo.anchor_source=frozen_start", f"cipo.frozen_attempts={tmp_path / 'f.jsonl'}"])
    assert cfg.cipo.anchor_source == "frozen_start"
    assert load_config(BASE, []).cipo.anchor_source == "policy"  # the default quotes the policy's own attempt


class RecordingGeneration:
    """Answers every prompt with one fixed token and keeps the prompts it was given."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def generate(self, prompts, settings):
        self.prompts += prompts
        return [[SampledResponse(token_ids=[2], logprobs=[-0.1], finish_reason="stop")] * settings.n
                for _ in prompts]


def _correction_prompts(tmp_path: Path, overrides: list[str]) -> tuple[list[str], int]:
    """correction_rollout on a base stream of 4 samples (a: 1 wrong, 1 right; b: 1 wrong, 1 right), every one an
    anchor; returns the decoded correction prompts and the dropped count."""
    tokenizer = build_tiny_tokenizer()
    cfg = load_config(BASE, ["cipo.samples_per_anchor=1", *overrides])
    base_texts = ["POLICY WRONG a", "POLICY RIGHT a", "POLICY WRONG b", "POLICY RIGHT b"]
    responses = [[SampledResponse(token_ids=tokenizer(text, add_special_tokens=False)["input_ids"],
                                  logprobs=[0.0] * len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                                  finish_reason="stop")] for text in base_texts]
    base = responses_to_batch([[1]] * 4, responses, item_indices=[0, 0, 1, 1], sample_kind="base",
                              tokenizer=tokenizer)
    anchors = AnchorSelection(indices=[1, 3, 0, 2], anchor_correct=[True, True, False, False],
                              in_window=[True] * 4, prompt_accuracy={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    generation = RecordingGeneration()
    c = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, generation=generation, progress=StepProgress())
    corrections, dropped = correction_rollout(c, base, anchors, _items(), step=3)
    assert corrections is not None
    return [tokenizer.decode(ids) for ids in generation.prompts], dropped


def test_frozen_start_correction_prompts_quote_the_frozen_attempts_not_the_policys(tmp_path: Path) -> None:
    own, dropped = _correction_prompts(tmp_path, [])
    assert dropped == 0 and [("POLICY RIGHT a" in p, "POLICY WRONG b" in p) for p in own] == \
        [(True, False), (False, False), (False, False), (False, True)]
    frozen, dropped = _correction_prompts(tmp_path, ["cipo.anchor_source=frozen_start",
                                                     f"cipo.frozen_attempts={_attempts_file(tmp_path)}"])
    assert not any("POLICY" in prompt for prompt in frozen)
    # right anchors quote the start's right attempts; a's wrong anchor one of its wrong ones; b has no wrong one
    assert "START RIGHT a" in frozen[0] and "START RIGHT b" in frozen[1]
    assert "START WRONG a" in frozen[2] and len(frozen) == 3 and dropped == 1


def test_the_preflight_refuses_attempts_at_other_items(tmp_path: Path) -> None:
    overrides = ["cipo.anchor_source=frozen_start", f"cipo.frozen_attempts={_attempts_file(tmp_path)}"]
    cfg = load_config(BASE, overrides)
    assert check_frozen_attempts(cfg, _items())["with_both"] == 1
    other = [TaskItem(id="z", family="math", prompt="?", messages=None, answer="1", origin="z", metadata={})]
    with pytest.raises(DataError, match="holds no attempt at any of the 1 training items"):
        check_frozen_attempts(cfg, other)
    assert check_frozen_attempts(load_config(BASE, []), other) == {}
