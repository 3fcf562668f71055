"""Presets and the launch plan: every preset dry-runs for the cluster its Slurm script asks for, without weights,
and broken layouts stop with exit code 2 and a message naming the rule and the keys to change."""

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

from cipo_nemo.__main__ import main
from cipo_nemo.config import load_config
from cipo_nemo.models.shapes import KNOWN_MODELS, find_model_shape, shape_from_config_json
from cipo_nemo.plan import layout_of, plan_launch

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# small data: the layout and the memory plan do not depend on the dataset's size
FAST = ["data.train.reasoning_gym.size=16", "verifier.num_workers=1"]

# preset -> (nodes, GPUs per node) of its Slurm script, and what its plan must say
PRESETS = {
    "cipo_llama3_70b_math.yaml": (8, 8, "policy: Megatron TP 4 x PP 4 x DP 4 = 64 ranks"),
    "cipo_llama3_70b_math_fp8.yaml": (8, 8, "fp8 e4m3 (blockwise)"),
    "grpo_llama3_70b_math.yaml": (8, 8, "rollouts per step: 1024 base (128 prompts x 8);"),
    "cipo_qwen3_4b_math.yaml": (1, 8, "policy: Megatron TP 1 x PP 1 x DP 8 = 8 ranks"),
    "cipo_seed_coder_8b_code.yaml": (2, 8, "generation: 16 vLLM engine(s) x TP 1"),
}


# the 70B layout split per node: 4 GPUs for the policy, 4 for one vLLM engine of TP 4
APART = ["generation.colocated=false", "cluster.devices_per_node=4", "cluster.generation_devices_per_node=4",
         "generation.vllm.tensor_parallel=4"]


@pytest.fixture(autouse=True)
def hub_reachable(monkeypatch):
    """The presets name hub models that are not here; with the hub reachable the dry run plans them without weights
    (it never downloads). Offline, an absent model stops it as it stops the run (tests/unit/test_dry_run_stops.py)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _dry_run(capsys, config: str, *overrides: str) -> tuple[int, str, str]:
    code = main(["--config", str(CONF / config), "--dry-run", *FAST, *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dry_runs_for_its_slurm_allocation(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # presets name data files relative to the repository, as the launcher runs them
    nodes, gpus, expected = PRESETS[name]
    cfg = load_config(CONF / name)
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (nodes, gpus)
    code, out, err = _dry_run(capsys, name, f"cluster.num_nodes={nodes}", f"cluster.devices_per_node={gpus}")
    assert code == 0, err
    assert expected in out
    assert f"cluster: {nodes} node(s) x {gpus} GPUs = {nodes * gpus} GPUs of 79.2 GiB" in out
    assert "architecture from the built-in table" in out  # no weights here: the dry run did not need them
    assert ": fits" in out and "dry run: preflight passed" in out


def test_cpu_default_dry_run_says_devices_are_processes(capsys):
    code, out, err = _dry_run(capsys, "cipo_smollm2_cpu.yaml")
    assert code == 0, err
    assert "1 CPU worker process(es)" in out and "no per-device budget is checked" in out
    assert "vLLM sleeps" not in out  # sleep/wake is a GPU-only no-op on CPU


def test_dry_run_says_when_the_risk_penalty_cannot_act(capsys):
    code, out, err = _dry_run(capsys, "cipo_smollm2_cpu.yaml", "cipo.advantage_mode=group")
    assert code == 0, err
    assert "cipo.risk_penalty does not change the advantages" in out
    for mode in ("stream", "anchor"):
        code, out, err = _dry_run(capsys, "cipo_smollm2_cpu.yaml", f"cipo.advantage_mode={mode}")
        assert code == 0, err
        assert "cipo.risk_penalty" not in out
    code, out, err = _dry_run(capsys, "cipo_smollm2_cpu.yaml", "cipo.advantage_mode=group", "cipo.risk_penalty=0")
    assert code == 0, err
    assert "cipo.risk_penalty" not in out


def test_dry_run_prints_each_side_and_the_async_schedule(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _dry_run(capsys, "cipo_llama3_70b_math.yaml", *APART, "generation.vllm.gpu_memory_utilization=0.9",
                              "async.enabled=true")
    assert code == 0, err
    assert "cluster: 8 node(s) x (4 policy + 4 generation) GPUs = 64 GPUs of 79.2 GiB" in out
    assert "policy: Megatron TP 4 x PP 4 x DP 2 = 32 ranks" in out
    assert "generation: 8 vLLM engine(s) x TP 4 (1 per node)" in out and "of their own" in out
    assert "vLLM on its own GPUs: 0.9 x 79.2 GiB: weights 32.9 GiB" in out
    assert "async: batch s is sampled by the weights after step s-2 while the policy trains on batch s-1" in out
    assert "consider loss.importance_sampling=true" in out
    code, out, err = _dry_run(capsys, "cipo_smollm2_cpu.yaml", "generation.colocated=false",
                              "cluster.generation_devices_per_node=1", "async.enabled=true",
                              "loss.importance_sampling=true")
    assert code == 0, err
    assert "(1 policy + 1 generation) CPU worker process(es) = 2" in out and "each side bound to its own cores" in out
    assert "consider loss.importance_sampling" not in out


def test_fp8_preset_inherits_the_70b_layout_and_turns_on_tis():
    bf16, fp8 = load_config(CONF / "cipo_llama3_70b_math.yaml"), load_config(CONF / "cipo_llama3_70b_math_fp8.yaml")
    assert fp8.policy.megatron.model_copy(update={"fp8": None}) == bf16.policy.megatron
    assert fp8.policy.megatron.fp8 == "e4m3" and fp8.generation.vllm.quantization == "fp8_per_block"
    assert fp8.loss.importance_sampling  # TIS on
    assert load_config(CONF / "grpo_llama3_70b_math.yaml").model_dump(exclude={"run", "cipo"}) == \
        bf16.model_dump(exclude={"run", "cipo"})


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        # SmolLM2 has 9 heads and 3 KV heads: TP 2 splits neither
        ("cipo_smollm2_cpu.yaml", ["cluster.devices_per_node=2", "policy.megatron.tensor_parallel=2"],
         "the model's 9 attention heads are not divisible by policy.megatron.tensor_parallel (2)"),
        ("cipo_llama3_70b_math.yaml", ["cluster.num_nodes=3"],
         "policy.megatron.tensor_parallel x pipeline_parallel = 4 x 4 = 16 does not divide the 24 GPUs"),
        ("cipo_qwen3_4b_math.yaml", ["policy.megatron.pipeline_parallel=8"],
         "the model's 36 layers are not divisible by policy.megatron.pipeline_parallel (8)"),
        ("cipo_llama3_70b_math.yaml", ["cluster.num_nodes=16", "cluster.devices_per_node=4"],
         "generation.vllm.tensor_parallel (8) does not divide cluster.devices_per_node (4)"),
        # NeMo-RL's 0.6 does not fit next to a policy that keeps its optimizer state on the GPU during generation
        ("cipo_llama3_70b_math.yaml", ["generation.vllm.gpu_memory_utilization=0.6",
                                       "policy.offload_optimizer_for_generation=false"],
         "exceeds cluster.gpu_memory_gib (79.2 GiB)"),
        ("cipo_llama3_70b_math.yaml", ["generation.vllm.gpu_memory_utilization=0.2"],
         "does not hold vLLM's weights (16.4 GiB per GPU)"),
        # TE's MXFP8 recipe needs Blackwell; the 70B FP8 preset runs on H100s (cluster.gpu_arch: hopper)
        ("cipo_llama3_70b_math_fp8.yaml", ["policy.megatron.fp8_recipe=mxfp8"],
         "policy.megatron.fp8_recipe is 'mxfp8' but cluster.gpu_arch is 'hopper': MXFP8 needs Blackwell GPUs"),
        ("cipo_llama3_70b_math_fp8.yaml", ["cluster.gpu_arch=ampere"],
         "policy.megatron.fp8 is 'e4m3' but cluster.gpu_arch is 'ampere': FP8 needs Hopper or Blackwell GPUs"),
        ("cipo_llama3_70b_math.yaml", [*APART, "generation.vllm.tensor_parallel=8"],
         "generation.vllm.tensor_parallel (8) does not divide cluster.generation_devices_per_node (4)"),
        # on its own GPUs vLLM has its share alone: 0.4 x 79.2 GiB does not hold TP4's 32.9 GiB of weights
        ("cipo_llama3_70b_math.yaml", [*APART, "generation.vllm.gpu_memory_utilization=0.4"],
         "= 31.7 GiB does not hold vLLM's weights (32.9 GiB per GPU)"),
    ],
    ids=["tp-vs-heads", "tp-pp-vs-gpus", "pp-vs-layers", "vllm-tp-vs-node", "memory", "vllm-share",
         "mxfp8-on-hopper", "fp8-on-ampere", "vllm-tp-vs-own-devices", "vllm-share-apart"],
)
def test_broken_layout_stops_naming_the_rule(config, overrides, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _dry_run(capsys, config, *overrides)
    assert code == 2
    assert err.startswith("config error: ") and message in err
    assert "dry run" not in out  # stopped before the data was even loaded


def test_mxfp8_passes_on_blackwell(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = _dry_run(capsys, "cipo_llama3_70b_math_fp8.yaml", "policy.megatron.fp8_recipe=mxfp8",
                              "cluster.gpu_arch=blackwell")
    assert code == 0, err
    assert "fp8 e4m3 (mxfp8)" in out


def test_memory_estimate_can_be_overridden(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["--config", str(CONF / "cipo_llama3_70b_math.yaml"), "--dry-run", "--ignore-memory-estimate", *FAST,
                 "generation.vllm.gpu_memory_utilization=0.75"])
    assert code == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_unknown_hub_model_without_weights_is_a_clear_error(capsys):
    code, _, err = _dry_run(capsys, "cipo_base.yaml", "policy.model_name=acme/NoSuchModel-7B")
    assert code == 2
    assert "model error: policy.model_name: 'acme/NoSuchModel-7B' is not a local checkpoint directory" in err


# published parameter counts (model cards / safetensors totals), to catch a typo in the table
@pytest.mark.parametrize(("name", "billions"), [
    ("meta-llama/Llama-3.3-70B-Instruct", 70.55), ("meta-llama/Llama-3.1-8B", 8.03), ("Qwen/Qwen3-4B", 4.02),
    ("Qwen/Qwen3-8B", 8.19), ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.135),
])
def test_known_architectures_match_published_sizes(name, billions):
    assert KNOWN_MODELS[name].total_params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_local_config_json_is_read_and_wins_over_the_table(tmp_path):
    qwen3 = {"num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
             "torch_dtype": "bfloat16"}  # Qwen3-4B's config.json: head_dim != hidden / heads
    (tmp_path / "config.json").write_text(json.dumps(qwen3))  # a checkpoint directory, weights not needed
    shape, source = find_model_shape(str(tmp_path))
    assert source == str(tmp_path / "config.json")
    assert shape == KNOWN_MODELS["Qwen/Qwen3-4B"]
    llama = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
             "vocab_size": 512}  # no KV heads, head_dim or tying: MHA, hidden / heads, untied
    (tmp_path / "config.json").write_text(json.dumps(llama))
    shape = shape_from_config_json(tmp_path / "config.json")
    assert (shape.num_kv_heads, shape.head_dim, shape.tied_embeddings) == (4, 32, False)


def test_distributed_optimizer_and_recompute_shrink_the_estimate():
    base = CONF / "cipo_llama3_70b_math.yaml"

    def memory(*overrides):
        cfg = load_config(base, list(overrides))
        return plan_launch(cfg, base_samples=1024, max_correction_samples=1024).memory

    sharded, whole = memory(), memory("policy.megatron.distributed_optimizer=false")
    assert whole.optimizer == pytest.approx(4 * sharded.optimizer)  # 12 bytes/param, sharded over DP 4
    assert whole.weights == sharded.weights and whole.gradients == pytest.approx(2 * sharded.weights)
    assert memory("policy.megatron.activation_recompute=false").activations > 10 * sharded.activations
    assert layout_of(load_config(base)).vllm_engines == 8


def test_logprob_chunks_shrink_the_logits_estimate():
    """The planner counts one chunk of full-vocab logits (policy.logprob_chunk_tokens), not a whole micro-batch."""
    base = CONF / "cipo_qwen3_4b_math.yaml"  # PP 1: the logits count on its one stage

    def logits(*overrides):
        cfg = load_config(base, list(overrides))
        return plan_launch(cfg, base_samples=1024, max_correction_samples=1024).memory.logits

    whole, chunked = logits("policy.logprob_chunk_tokens=0"), logits("policy.logprob_chunk_tokens=512")
    assert chunked > 0 and whole > 4 * chunked
    assert logits("policy.logprob_chunk_tokens=1024") == pytest.approx(2 * chunked)
