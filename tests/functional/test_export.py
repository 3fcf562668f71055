"""`cipo-nemo export` and `cipo_nemo.eval --model CHECKPOINT` on real checkpoints of tiny models.

One Megatron run over gloo at TP2 (tiny Llama) and one at PP2 (tiny Qwen2 with tied embeddings): one train step,
then a checkpoint laid out as the trainer writes it (policy/ by dist_checkpointing, config.yaml saying the layout,
COMPLETE) and the run's own HF export at the same step (`save_hf`). The export, loaded on one process at TP1/PP1,
must hold the same weights as `save_hf` and give the policy's logprobs. An HF-backend checkpoint exports the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from multirank import run_on_ranks
from policy_cases import LOSS, STEP_WEIGHT_TOLERANCE, make_batch, max_abs_diff, max_weight_diff
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipo_nemo import cli
from cipo_nemo.config import MasterConfig, load_config, to_yaml
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.tiny import build_tiny_model_dir
from cipo_nemo.utils.checkpoint import CheckpointManager

pytestmark = pytest.mark.slow  # Megatron ranks (gloo), CLI runs that load checkpoints

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
REPO = BASE.parents[1]
LOGPROB_TOLERANCE = 1e-4  # as tests/functional/test_megatron_policy.py: TP reductions reorder float sums
LAYOUTS = {"tp2": {"tensor_parallel": 2}, "pp2": {"pipeline_parallel": 2}}


def _run_config(model_dir: Path, run_dir: Path, *overrides: str) -> MasterConfig:
    return load_config(BASE, [f"run.output_dir={run_dir}", f"policy.model_name={model_dir}", "policy.precision=fp32",
                              "policy.optimizer.lr=1e-3", "policy.optimizer.adam_eps=1e-6", "policy.micro_batch_size=2",
                              "policy.logprob_micro_batch_size=4", *overrides])


def _publish(cfg: MasterConfig, policy_dir: Path, step: int) -> Path:
    """The trainer's checkpoint layout around a policy directory already written: step_N/{policy, config.yaml}."""
    def write(directory: Path) -> None:
        shutil.move(policy_dir, directory / "policy")
        (directory / "config.yaml").write_text(to_yaml(cfg))

    return CheckpointManager(Path(cfg.run.output_dir) / "checkpoints", keep_last=2).save(step, write)


def train_and_save(rank: int, world_size: int, cfg: MasterConfig, batch: Batch, policy_dir: str,
                   hf_dir: str) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(policy=cfg.policy, num_steps=2, seed=0)
    worker.train(batch, LOSS, global_denominator=float(LOSS.local_denominator([batch])))
    result = {"is_output_rank": worker.is_output_rank, "logprobs": worker.get_logprobs(batch)}
    worker.save_checkpoint(policy_dir)
    worker.save_hf(hf_dir)
    worker.shutdown()
    return result


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per layout: the checkpoint, the run's save_hf directory, the output rank's logprobs, the base model."""
    root = tmp_path_factory.mktemp("export_megatron")
    models = {"tp2": build_tiny_model_dir(root / "llama", architecture="llama"),
              "pp2": build_tiny_model_dir(root / "qwen2", architecture="qwen2", tie_word_embeddings=True)}
    runs = {}
    for layout, megatron in LAYOUTS.items():
        model_dir, run_dir = models[layout], root / f"run_{layout}"
        overrides = [f"policy.megatron.{key}={value}" for key, value in megatron.items()]
        cfg = _run_config(model_dir, run_dir, "policy.backend=megatron", *overrides)
        batch = make_batch(vocab_size=len(AutoTokenizer.from_pretrained(model_dir)))
        per_rank = run_on_ranks(train_and_save, world_size=2,
                                args=(cfg, batch, str(root / f"policy_{layout}"), str(run_dir / "hf_step1")))
        (output,) = [result for result in per_rank if result["is_output_rank"]]
        runs[layout] = {"checkpoint": _publish(cfg, root / f"policy_{layout}", step=1), "hf_by_run": run_dir / "hf_step1",
                        "logprobs": output["logprobs"], "batch": batch, "model_dir": model_dir, "root": root}
    return runs


def _export_in_subprocess(checkpoint: Path, out_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cipo_nemo.cli", "export", str(checkpoint), str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    return done, time.monotonic() - started


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def _logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_checkpoint_exports_what_the_policy_had(layout: str, megatron_runs: dict, tmp_path: Path) -> None:
    run = megatron_runs[layout]
    saved = yaml.safe_load((run["checkpoint"] / "config.yaml").read_text())["policy"]["megatron"]
    assert {key: saved[key] for key in LAYOUTS[layout]} == LAYOUTS[layout]  # the layout the export must undo
    out = tmp_path / "hf"
    done, seconds = _export_in_subprocess(run["checkpoint"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"hf_model: {out}"  # megatron prints a line before
    print(f"\n{layout}: export took {seconds:.1f} s (subprocess, imports included)")
    # the same weights as the run's own HF export at that step: resharding to TP1/PP1 only concatenates
    exported, by_run = _weights(out), _weights(run["hf_by_run"])
    assert max_weight_diff(exported, by_run) == 0.0
    # and not the base model's: the step moved them (an export of the initial weights would fail here)
    base = _weights(run["model_dir"])
    assert max(max_abs_diff(exported[name], base[name]) for name in exported) > STEP_WEIGHT_TOLERANCE
    # transformers loads it; its logits equal those of the run's export; its logprobs equal the policy's at save
    input_ids = run["batch"]["input_ids"][:2, :12].long()
    assert max_abs_diff(_logits(out, input_ids), _logits(run["hf_by_run"], input_ids)) == 0.0
    logprobs = HFPolicy(policy=_run_config(out, tmp_path / "unused").policy, num_steps=1, seed=0).get_logprobs(run["batch"])
    print(f"{layout}: exported vs policy logprobs max abs diff {max_abs_diff(logprobs, run['logprobs']):.2e}")
    assert max_abs_diff(logprobs, run["logprobs"]) < LOGPROB_TOLERANCE
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(run["model_dir"]))


def _checkpoint_tensor_keys(policy_dir: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(policy_dir)))


def test_transformer_engine_checkpoint_exports_on_the_host_with_the_local_spec(megatron_runs: dict,
                                                                              tmp_path: Path) -> None:
    """A checkpoint whose config says the TE layer spec (with FP8 and sequence parallelism) exports where Transformer
    Engine cannot import, through megatron's local spec in host memory: same weights as the run's own export."""
    from cipo_nemo.models.policy.cpu_compat import prepare_megatron_imports

    prepare_megatron_imports()
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry

    run = megatron_runs["tp2"]
    checkpoint = tmp_path / "run" / "checkpoints" / run["checkpoint"].name
    shutil.copytree(run["checkpoint"], checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["policy"]["megatron"] |= {"layer_spec": "transformer_engine", "fp8": "e4m3", "fp8_recipe": "blockwise",
                                     "sequence_parallel": True}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    # the norms are stored under Transformer Engine's fused names (the bridge's TE <-> separate-norm aliases), so a
    # TE-trained checkpoint has the keys the local spec asks for
    keys = _checkpoint_tensor_keys(checkpoint / "policy")
    fused, separate = zip(*MegatronMappingRegistry._SEPARATE_LAYERNORM_REWRITES, strict=True)
    assert {f"decoder.layers.{name}" for name in fused
            if name in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")} <= keys
    assert not {f"decoder.layers.{name}" for name in separate} & keys
    out = tmp_path / "hf"
    done, _ = _export_in_subprocess(checkpoint, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_weight_diff(_weights(out), _weights(run["hf_by_run"])) == 0.0


def test_export_into_a_non_empty_directory_is_refused_and_leaves_it(megatron_runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done, _ = _export_in_subprocess(megatron_runs["tp2"]["checkpoint"], out)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {out} exists and is not empty; pass a new or empty directory"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_hf_backend_checkpoint_exports_the_trained_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = build_tiny_model_dir(tmp_path / "llama", architecture="llama")
    cfg = _run_config(model_dir, tmp_path / "run", "policy.backend=hf")
    batch = make_batch(vocab_size=len(AutoTokenizer.from_pretrained(model_dir)))
    policy = HFPolicy(policy=cfg.policy, num_steps=2, seed=0)
    policy.train(batch, LOSS)
    policy.save_checkpoint(tmp_path / "policy")
    policy.save_hf(tmp_path / "hf_by_run")
    checkpoint = _publish(cfg, tmp_path / "policy", step=1)
    out = tmp_path / "empty_out"
    out.mkdir()  # an empty directory is fine
    assert cli.main(["export", str(checkpoint), str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"hf_model: {out}")
    assert max_weight_diff(_weights(out), _weights(tmp_path / "hf_by_run")) == 0.0
    exported = HFPolicy(policy=_run_config(out, tmp_path / "unused").policy, num_steps=1, seed=0)
    assert max_abs_diff(exported.get_logprobs(batch), policy.get_logprobs(batch)) == 0.0


def test_eval_takes_a_checkpoint_and_reuses_its_export(megatron_runs: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cipo_nemo.eval.__main__ import main as eval_main

    monkeypatch.setenv("CIPO_NEMO_CACHE", str(tmp_path / "cache"))
    problems = tmp_path / "sums.jsonl"
    problems.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                                for a in range(3)))
    run = megatron_runs["tp2"]
    args = ["--model", str(run["checkpoint"]), "--benchmarks", str(problems), "--n", "2", "--k", "1,2",
            "generation.backend=hf", "generation.max_new_tokens=4", "verifier.num_workers=1"]
    started = time.monotonic()
    assert eval_main([*args, "--output-dir", str(tmp_path / "first")]) == 0
    first_s = time.monotonic() - started
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    export_dir = Path(first["model"])
    assert export_dir.parent == tmp_path / "cache" / "exports"  # the checkpoint was exported into the cache
    assert max_weight_diff(_weights(export_dir), _weights(run["hf_by_run"])) == 0.0
    assert first["benchmarks"]["sums"]["metrics"]["problems"] == 3
    written = (export_dir / "config.json").stat().st_mtime_ns
    started = time.monotonic()
    assert eval_main([*args, "--output-dir", str(tmp_path / "second")]) == 0
    second_s = time.monotonic() - started
    second = json.loads((tmp_path / "second" / "results.json").read_text())
    assert Path(second["model"]) == export_dir and (export_dir / "config.json").stat().st_mtime_ns == written
    print(f"\neval --model checkpoint: first {first_s:.1f} s (export included), second {second_s:.1f} s (reused)")
    assert list((tmp_path / "cache" / "exports").iterdir()) == [export_dir]  # no partial directories left
