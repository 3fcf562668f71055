"""Config: inheritance, overrides, validation errors that name key and file, and every YAML under conf/."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cipo_nemo.config import ConfigError, MasterConfig, load_config, resolve, to_yaml
from cipo_nemo.config.loader import _model_in

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
BASE = CONF / "cipo_base.yaml"
ALL_CONFIGS = sorted(CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_in_conf_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, MasterConfig)


def test_conf_holds_the_exemplar_and_the_grpo_preset():
    names = {p.name for p in ALL_CONFIGS}
    assert {"cipo_base.yaml", "grpo_base.yaml"} <= names


def _schema_leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"  # the YAML key (`async` for the field async_)
        sub = _model_in(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is None:
            paths |= _schema_leaf_paths(sub, key + ".")
        else:
            paths.add(key)
    return paths


def _yaml_leaf_paths(node, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node and not prefix.endswith("options."):
        out = set()
        for name, child in node.items():
            out |= _yaml_leaf_paths(child, f"{prefix}{name}.")
        return out
    return {prefix.rstrip(".")}


def test_exemplar_sets_every_schema_field_and_nothing_else():
    raw = yaml.safe_load(BASE.read_text())
    # Optional sections that are null in the exemplar (data.validation) count as set.
    assert _yaml_leaf_paths(raw) == _schema_leaf_paths(MasterConfig)


def test_grpo_preset_is_cipo_with_correction_off():
    cipo, grpo = load_config(BASE), load_config(CONF / "grpo_base.yaml")
    assert cipo.cipo.enabled is True and grpo.cipo.enabled is False
    assert grpo.run.name == "grpo"
    # Interpolation resolves after merging: the child's run.name reaches output_dir.
    assert grpo.run.output_dir == "results/grpo"
    assert grpo.loss == cipo.loss and grpo.grpo == cipo.grpo


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_inheritance_is_recursive_and_child_wins(tmp_path):
    _write(tmp_path / "a.yaml", f"defaults: {BASE}\nrun:\n  seed: 1\ngrpo:\n  num_steps: 10\n")
    _write(tmp_path / "b.yaml", "defaults: a.yaml\ngrpo:\n  num_steps: 20\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.grpo.num_steps == 20  # child beats parent
    assert cfg.run.seed == 1  # grandparent's value reached through the parent
    assert cfg.grpo.samples_per_prompt == 8  # from the exemplar


def test_defaults_list_merges_in_order(tmp_path):
    _write(tmp_path / "x.yaml", "grpo:\n  num_steps: 3\n  prompts_per_step: 3\n")
    _write(tmp_path / "y.yaml", "grpo:\n  num_steps: 4\n")
    _write(tmp_path / "c.yaml", f"defaults: [{BASE}, x.yaml, y.yaml]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.grpo.num_steps, cfg.grpo.prompts_per_step) == (4, 3)


def test_defaults_cycle_is_an_error(tmp_path):
    _write(tmp_path / "p.yaml", "defaults: q.yaml\n")
    _write(tmp_path / "q.yaml", "defaults: p.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "p.yaml")


def test_overrides_change_add_and_parse_yaml_values():
    cfg = load_config(BASE, ["grpo.num_steps=7", "grpo.std_eps=1e-8", "cipo.enabled=false",
                             "++data.train.reasoning_gym.options.max_terms=3", "data.system_prompt=null"])
    assert cfg.grpo.num_steps == 7
    assert cfg.grpo.std_eps == pytest.approx(1e-8)  # 1e-8 is a float, not the string PyYAML would make
    assert cfg.cipo.enabled is False
    assert cfg.data.train.reasoning_gym.options == {"max_terms": 3}
    assert cfg.data.system_prompt is None


def test_plain_override_of_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(BASE, ["cipo.rho.tua=0.5"])
    assert str(err.value).startswith("command line: cipo.rho.tua: no such key")
    assert "cipo.rho.tau" in str(err.value)


def test_single_plus_refuses_an_existing_key():
    with pytest.raises(ConfigError, match="already set"):
        load_config(BASE, ["+grpo.num_steps=3"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(BASE, ["grpo.num_steps"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("cipo.difficulty_low=1.5", "command line: cipo.difficulty_low: Input should be less than or equal to 1"),
        ("cipo.rho.min=0.9", "cipo.rho.max: must be >= min (0.9)"),
        ("loss.clip_low=-0.1", "command line: loss.clip_low: Input should be greater than or equal to 0"),
        ("grpo.num_steps=abc", "command line: grpo.num_steps: Input should be a valid integer (got 'abc')"),
        ("grpo.num_steps=2.5", "grpo.num_steps: Input should be a valid integer"),
        ("grpo.normalize_std=1", "grpo.normalize_std: Input should be a valid boolean"),
        ("loss.normalization=mean", "loss.normalization: Input should be 'token' or 'sequence'"),
        ("cipo.difficulty_low=0.9", "cipo.difficulty_high: must be >= difficulty_low (0.9)"),
        ("cipo.rho.init=0.9", "command line: cipo.rho.init: must lie in [min, max] = [0.2, 0.8]"),
        ("++cipo.rho.tua=0.5", "command line: cipo.rho.tua: unknown key (did you mean tau"),
        ("cipo.templates.math=no placeholders", "cipo.templates.math: template lacks the placeholder(s) {problem}"),
        ("data.train.kind=file", "data.train.file: kind is 'file' but file.path is not set"),
        ("loss.kl_beta=0.1", "policy: reference_policy is 'none' but loss.kl_beta = 0.1 needs the reference policy"),
        ("validation.every=5", "validation: every > 0 but data.validation is null"),
        ("validation.pass_k=[1,8]", "validation: pass_k [1, 8] needs samples_per_prompt >= 8"),
        ("policy.optimizer.min_lr=1e-3", "policy.optimizer.min_lr: must be <= lr (1e-06)"),
        ("generation.vllm.gpu_memory_utilization=0", "generation.vllm.gpu_memory_utilization: Input should be greater than 0"),
        ("loss.is_lower_bound=3", "loss.is_lower_bound: must be <= is_truncation (2.0): the band [L, C] is empty"),
        ("loss.is_type=gspo", "loss.is_type: Input should be 'tis', 'icepop' or 'seq-mask-tis'"),
        ("generation.colocated=false", "cluster: generation.colocated is false: set generation_devices_per_node"),
        ("cluster.generation_devices_per_node=1", "generation_devices_per_node is set but generation.colocated is true"),
        ("async.max_trajectory_age=2", "command line: async.max_trajectory_age: Input should be 0 or 1"),
        ("async.enabled=true", "async: max_trajectory_age 1 samples while the policy trains, so the vLLM engines need "
                               "devices of their own: set generation.colocated=false"),
    ],
)
def test_bad_values_are_rejected_naming_key_and_source(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    assert expected in str(err.value)


def test_async_section_reads_and_writes_as_async():
    """`async` is a Python keyword: the field is async_, the YAML key (and the written config.yaml) `async`."""
    apart = ["async.enabled=true", "generation.colocated=false", "cluster.generation_devices_per_node=1"]
    cfg = load_config(BASE, apart)
    assert cfg.async_.enabled and cfg.async_.max_trajectory_age == 1
    written = yaml.safe_load(to_yaml(cfg))
    assert written["async"]["enabled"] is True and "async_" not in written
    assert MasterConfig.model_validate(written) == cfg
    # HF backends run in this process: overlap needs no devices of their own
    assert load_config(BASE, ["async.enabled=true", "policy.backend=hf", "generation.backend=hf"]).async_.enabled


def test_fp8_needs_transformer_engine():
    with pytest.raises(ConfigError, match="policy.megatron.fp8: fp8 needs layer_spec auto or transformer_engine"):
        load_config(BASE, ["policy.megatron.layer_spec=local", "policy.megatron.fp8=e4m3"])
    assert load_config(BASE, ["policy.megatron.fp8=e4m3"]).policy.megatron.fp8 == "e4m3"


def test_error_names_the_file_a_bad_value_came_from(tmp_path):
    child = _write(tmp_path / "child.yaml", f"defaults: {BASE}\ncipo:\n  rho:\n    tau: 1.5\n  risk_penalty: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{child}: ") for line in lines)  # tmp_path lies outside cwd: shown absolute
    assert any("cipo.rho.tau: must be a probability in [0, 1] or 'auto' (got 1.5)" in line for line in lines)
    assert any("cipo.risk_penalty: Input should be greater than or equal to 0" in line for line in lines)


def test_unknown_key_in_a_file_is_rejected_with_its_file(tmp_path):
    child = _write(tmp_path / "typo.yaml", f"defaults: {BASE}\ngrpo:\n  sample_per_prompt: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert "typo.yaml: grpo.sample_per_prompt: unknown key (did you mean samples_per_prompt" in str(err.value)


def test_missing_key_and_missing_file(tmp_path):
    partial = _write(tmp_path / "partial.yaml", "run:\n  name: x\n")
    with pytest.raises(ConfigError, match="grpo: required key is missing"):
        load_config(partial)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken_parent = _write(tmp_path / "orphan.yaml", "defaults: gone.yaml\n")
    with pytest.raises(ConfigError, match="parent config .*gone.yaml not found"):
        load_config(broken_parent)


def test_invalid_yaml_names_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = load_config(BASE)
    with pytest.raises(Exception, match="frozen"):
        cfg.grpo.num_steps = 3


def test_resolve_records_provenance_per_key(tmp_path):
    child = _write(tmp_path / "prov.yaml", f"defaults: {BASE}\ngrpo:\n  num_steps: 9\n")
    _, provenance = resolve(child, ["run.seed=5"])
    assert provenance.source_of("grpo.num_steps").endswith("prov.yaml")
    assert provenance.source_of("grpo.prompts_per_step").endswith("cipo_base.yaml")
    assert provenance.source_of("run.seed") == "command line"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cipo_nemo.config", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_resolved_config():
    result = _cli("conf/cipo_base.yaml", "grpo.num_steps=3", "run.name=demo")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["grpo"]["num_steps"] == 3
    assert printed["run"]["output_dir"] == "results/demo"
    assert MasterConfig.model_validate(printed) == load_config(BASE, ["grpo.num_steps=3", "run.name=demo"])


def test_cli_error_is_one_line_and_nonzero():
    result = _cli("conf/cipo_base.yaml", "loss.clip_high=-1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "config error: command line: loss.clip_high: Input should be greater than or equal to 0 (got -1)"
    ]


# validation on a held-out set, every 5 steps, pass@1 and pass@4
WITH_VALIDATION = ["++data.validation={kind: reasoning_gym, family: math, reasoning_gym: {name: basic_arithmetic, "
                   "size: 8, seed: 1, options: {}}, file: {path: null, format: auto, split: null, fields: {id: null, "
                   "prompt: prompt, messages: null, answer: answer, family: null}}, hf: {path: null, name: null, "
                   "split: test, revision: null, fields: {id: null, prompt: prompt, messages: null, answer: answer, "
                   "family: null}}}", "validation.every=5"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["checkpointing.keep_best=val/pass@1"],
         "validation: checkpointing.keep_best is 'val/pass@1' but every is 0: set validation.every > 0"),
        ([*WITH_VALIDATION, "checkpointing.keep_best=val/pass@2", "checkpointing.save_every=10"],
         "checkpointing.keep_best 'val/pass@2' is not a validation metric; one of ['val/reward_mean', 'val/pass@1', "
         "'val/pass@4']"),
        ([*WITH_VALIDATION, "checkpointing.keep_best=val/pass@1", "checkpointing.save_every=7"],
         "checkpointing.keep_best needs checkpointing.save_every (7) to be a multiple of every (5)"),
        ([*WITH_VALIDATION, "checkpointing.keep_best=val/pass@1", "checkpointing.save_every=0"],
         "checkpointing.keep_best needs checkpointing.save_every (0) to be a multiple of every (5)"),
        (["checkpointing.keep_best_mode=maximum"], "checkpointing.keep_best_mode: Input should be 'max' or 'min'"),
    ],
)
def test_keep_best_needs_a_metric_that_validation_computes_at_each_save(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, overrides)
    assert expected in str(err.value)


def test_keep_best_accepts_a_validation_metric_at_save_steps():
    cfg = load_config(BASE, [*WITH_VALIDATION, "checkpointing.keep_best=val/reward_mean", "checkpointing.save_every=10",
                             "checkpointing.keep_best_mode=min"])
    assert (cfg.checkpointing.keep_best, cfg.checkpointing.keep_best_mode) == ("val/reward_mean", "min")
    assert load_config(BASE).checkpointing.keep_best is None  # off by default
