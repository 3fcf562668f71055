"""Preflight: the plan arithmetic, the gold-answer check, and clear stops on bad data before any worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.data.sources import DataError
from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer
from cipo_nemo.preflight import plan_step, run_preflight

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"


def test_plan_counts_base_and_correction_samples():
    cfg = load_config(BASE, ["grpo.prompts_per_step=4", "grpo.samples_per_prompt=8",
                             "cipo.max_anchors_per_step=6", "cipo.samples_per_anchor=4"])
    plan = plan_step(cfg)
    # 4 * 8 = 32 base; 6 anchors * 4 = 24 corrections; 56 at most
    assert (plan.base_samples, plan.max_anchors, plan.max_correction_samples, plan.max_samples) == (32, 6, 24, 56)


def test_plan_for_grpo_has_no_correction_samples():
    plan = plan_step(load_config(REPO / "conf" / "grpo_base.yaml"))
    assert (plan.max_anchors, plan.max_correction_samples, plan.max_samples) == (0, 0, 64)


def test_anchor_cap_never_exceeds_base_rollouts():
    cfg = load_config(BASE, ["grpo.prompts_per_step=1", "grpo.samples_per_prompt=2", "cipo.max_anchors_per_step=8"])
    assert plan_step(cfg).max_anchors == 2


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gold_check_counts_golds_the_verifier_cannot_read(tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", [
        {"prompt": "1+1?", "answer": "2"},
        {"prompt": "half?", "answer": "\\frac{1}{2}"},
        {"prompt": "broken gold", "answer": "\\frac{1}{"},  # unbalanced: no answer the verifier can read
    ])
    cfg = load_config(BASE, ["data.train.kind=file", f"data.train.file.path={data}", "verifier.num_workers=1",
                             "data.max_bad_rows=0.5"])
    report = run_preflight(cfg)
    assert report.data[0].loaded == 3
    assert report.gold_check["correct"] == 2
    assert sum(report.gold_check.values()) == 3


def test_preflight_hands_its_loaded_items_to_the_trainer(tmp_path, monkeypatch):
    """The data sources are read once: the preflight's items go to trainer.setup, which reads nothing again."""
    data = _jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}])
    cfg = load_config(BASE, ["data.train.kind=file", f"data.train.file.path={data}", "verifier.num_workers=1"])
    report = run_preflight(cfg)
    assert [item.answer for item in report.items["train"]] == ["2", "4"] and "validation" not in report.items

    import cipo_nemo.data.prompts as prompts  # trainer.setup loads its prompts through prompts.load_prompts

    def no_second_read(source):
        raise AssertionError("setup read a data source that the preflight had loaded")

    monkeypatch.setattr(prompts, "load_items", no_second_read)
    tokenizer = build_tiny_tokenizer()
    kept = prompts.load_prompts(cfg, tokenizer, split="train", items=report.items["train"])
    assert [item.answer for item in kept] == ["2", "4"]


def test_too_many_bad_rows_stop_the_preflight(tmp_path):
    # 3 of 5 rows malformed (no answer, not JSON, empty prompt) and 1 of the 2 kept golds unreadable
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "x"}) + "\n"
                    + "not json\n" + json.dumps({"prompt": " ", "answer": "3"}) + "\n"
                    + json.dumps({"prompt": "half?", "answer": "\\frac{1}{"}) + "\n")
    overrides = ["data.train.kind=file", f"data.train.file.path={data}", "verifier.num_workers=1"]
    with pytest.raises(DataError, match=r"data\.train: 4 of 5 rows are unusable.*data\.max_bad_rows = 5%"):
        run_preflight(load_config(BASE, overrides))
    assert run_preflight(load_config(BASE, [*overrides, "data.max_bad_rows=0.8"])).data[0].loaded == 2
    # through the CLI: one line, exit code 2
    completed = subprocess.run([sys.executable, "-m", "cipo_nemo", "--dry-run", "--config", str(BASE), *overrides],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 2 and "data error: data.train: 4 of 5 rows are unusable" in completed.stderr


def test_dataset_with_no_usable_row_stops_naming_the_section(tmp_path):
    data = _jsonl(tmp_path / "empty.jsonl", [{"prompt": "no answer here"}])
    cfg = load_config(BASE, ["data.train.kind=file", f"data.train.file.path={data}"])
    with pytest.raises(DataError, match=r"data\.train: .*empty\.jsonl"):
        run_preflight(cfg)


def test_cli_stops_with_one_line_on_a_bad_value():
    result = subprocess.run([sys.executable, "-m", "cipo_nemo", "--dry-run", "cipo.rho.max=3"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: command line: cipo.rho.max: Input should be less than or equal to 1 (got 3)"


def test_cli_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "cipo_nemo", "--config", str(BASE), "--dry-run",
                             "data.train.reasoning_gym.size=20", f"run.output_dir={tmp_path / 'run'}",
                             f"policy.model_name={model_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "per step: 64 base rollouts, up to 8 anchors and 64 correction rollouts" in result.stdout
    assert "dry run: preflight passed, nothing trained" in result.stdout
    assert not (tmp_path / "run").exists()


def test_cli_model_directory_without_config_is_rejected(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cipo_nemo", "--config", str(BASE), "--dry-run",
                             "data.train.reasoning_gym.size=20", f"policy.model_name={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"model error: policy.model_name: {tmp_path} is a directory without config.json" in result.stderr


def test_cli_missing_model_directory_is_one_clear_line(tmp_path):
    missing = tmp_path / "no_such_model"
    result = subprocess.run([sys.executable, "-m", "cipo_nemo", "--config", str(BASE), "--dry-run",
                             "data.train.reasoning_gym.size=20", f"policy.model_name={missing}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"model error: policy.model_name: directory {missing} does not exist"
    assert not (tmp_path / "run").exists()


def _fake_transformer_engine(root: Path, pytorch_module: str) -> Path:
    """A `transformer_engine` package on its own path whose `pytorch` submodule has the given source."""
    package = root / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pytorch" / "__init__.py").write_text(pytorch_module)
    return root


BROKEN_TE = 'raise OSError("libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDevice")\n'


@pytest.mark.parametrize(("pytorch_module", "expected"), [
    (None, "False"),  # not installed: the CPU profile
    ("", "True"),  # installed and importable
    (BROKEN_TE, "TransformerEngineBroken: Transformer Engine is installed"),
])
def test_transformer_engine_importable_imports_it(tmp_path, pytorch_module, expected):
    path = tmp_path if pytorch_module is None else _fake_transformer_engine(tmp_path, pytorch_module)
    probe = ("from cipo_nemo.models.policy.cpu_compat import transformer_engine_importable as f\n"
             "try:\n    print(f())\nexcept Exception as err:\n    print(type(err).__name__ + ': ' + str(err))\n")
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": f"{path}:{REPO}"},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().startswith(expected), result.stderr
    if pytorch_module == BROKEN_TE:
        assert "import transformer_engine.pytorch` fails: OSError: libtransformer_engine.so" in result.stdout


def test_cli_dry_run_stops_on_a_broken_transformer_engine(tmp_path):
    fake = _fake_transformer_engine(tmp_path / "site", BROKEN_TE)
    model_dir = build_tiny_model_dir(tmp_path / "model")
    command = [sys.executable, "-m", "cipo_nemo", "--config", str(BASE), "--dry-run", "data.train.reasoning_gym.size=20",
               f"policy.model_name={model_dir}", "policy.backend=megatron"]
    env = {**os.environ, "PYTHONPATH": f"{fake}:{REPO}"}
    result = subprocess.run([*command, "policy.megatron.layer_spec=auto"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("install error: Transformer Engine is installed (") and \
        "libtransformer_engine.so" in result.stderr and "policy.megatron.layer_spec=local" in result.stderr
    # the local spec does not use TE: the same broken install does not stop that run
    result = subprocess.run([*command, "policy.megatron.layer_spec=local"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
