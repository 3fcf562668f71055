"""A dry run fails when the run would: every condition that stops the training run before its workers start stops
`--dry-run` too, with exit status 2 and the same one line. Each case runs the entry point twice, as a dry run and
as a training run whose workers must never start. (An absent hub model offline: tests/unit/test_hub_models.py;
an absent hub dataset offline: tests/unit/test_hub_datasets.py; layouts: tests/unit/test_presets.py; another
setup's checkpoint: tests/unit/test_resume_guard.py; a broken Transformer Engine: tests/unit/test_preflight.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import cipo_nemo.__main__ as entry
from cipo_nemo.models.tiny import build_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def run_main(capsys, *overrides: str, dry_run: bool) -> tuple[int, str, str]:
    code = entry.main(["--config", str(BASE), *(["--dry-run"] if dry_run else []), "verifier.num_workers=1",
                       "data.train.reasoning_gym.size=8", "policy.backend=hf", "generation.backend=hf", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_and_real(capsys, monkeypatch, *overrides: str) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    monkeypatch.setattr(entry, "run_training", lambda *args: pytest.fail("the training run got past its preflight"))
    return run_main(capsys, *overrides, dry_run=True), run_main(capsys, *overrides, dry_run=False)


CASES = {
    "validation benchmark absent offline": (
        ["validation.benchmarks=[aime24]"],
        "data error: validation.benchmarks aime24: dataset 'HuggingFaceH4/aime_2024' is not in the Hugging Face cache "
        "{hub} and HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache first "
        "(hf download HuggingFaceH4/aime_2024 --repo-type dataset)"),
    "unknown validation benchmark": (
        ["validation.benchmarks=[aime2024]"],
        "config error: validation.benchmarks: unknown benchmark 'aime2024'; named benchmarks: math500, aime24, aime25, "
        "amc23, gsm8k, minerva, olympiadbench, openai_humaneval, mbpp"),
    "custom reward not importable": (
        ["verifier.custom=no_such_module:reward"],
        "config error: verifier.custom: cannot import module 'no_such_module'"),
    "tracker not installed": (
        ["logger.wandb.project=demo"],
        "install error: logger.wandb.project is set but wandb is not installed"),
    "chat template file missing": (
        ["data.chat_template=/no/such/template.jinja"],
        "data error: data.chat_template: no such file /no/such/template.jinja"),
    "no prompt within data.max_prompt_tokens": (
        ["data.max_prompt_tokens=4"],
        "data error: data.train: every one of the 8 prompts is longer than data.max_prompt_tokens=4 tokens"),
    "data file missing": (
        ["data.train.kind=file", "data.train.file.path=/no/such/train.jsonl"],
        "data error: data.train: data file not found: /no/such/train.jsonl"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_dry_run_stops_where_the_run_stops_with_the_same_line(case, offline_hub, model_dir, tmp_path, capsys,
                                                                    monkeypatch):
    overrides, expected = CASES[case]
    if case == "tracker not installed":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    dry, real = dry_and_real(capsys, monkeypatch, f"policy.model_name={model_dir}",
                             f"run.output_dir={tmp_path / 'run'}", *overrides)
    assert dry[0] == real[0] == 2, (dry, real)
    assert dry[2] == real[2] and len(dry[2].strip().splitlines()) == 1, (dry[2], real[2])
    assert dry[2].startswith(expected.format(hub=offline_hub)), dry[2]
    assert "preflight passed" not in dry[1]
    assert not (tmp_path / "run").exists()


def test_a_dry_run_that_can_check_everything_still_passes(offline_hub, model_dir, tmp_path, capsys, monkeypatch):
    dry = run_main(capsys, f"policy.model_name={model_dir}", f"run.output_dir={tmp_path / 'run'}",
                   "data.max_prompt_tokens=512", dry_run=True)
    assert dry[0] == 0, dry[2]
    assert "prompts over data.max_prompt_tokens=512 dropped: train 0" in dry[1]
    assert "dry run: preflight passed, nothing trained" in dry[1]
