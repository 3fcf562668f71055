"""Command-line overrides in Hydra's grammar: deletion, quoting, and errors that are one line naming the command
line (never a traceback, never cipo_base.yaml for a value the command line set)."""

from pathlib import Path

import pytest

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.config.__main__ import main as config_main

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def test_tilde_deletes_a_key():
    cfg = load_config(BASE, ["++data.train.reasoning_gym.options.max_terms=3",
                             "++data.train.reasoning_gym.options.min_terms=2",
                             "~data.train.reasoning_gym.options.max_terms"])
    assert cfg.data.train.reasoning_gym.options == {"min_terms": 2}
    cfg = load_config(BASE, ["++data.train.reasoning_gym.options.max_terms=3",
                             "~data.train.reasoning_gym.options.max_terms=3"])  # only if it holds that value
    assert cfg.data.train.reasoning_gym.options == {}


def test_quoted_values_keep_braces_and_colons():
    template = "Fix this: {problem}\nAttempt: {attempt}"
    cfg = load_config(BASE, [f"cipo.templates.math='{template}'", "run.name='a: b, c'", 'data.system_prompt="{x}"'])
    assert cfg.cipo.templates.math == template
    assert cfg.run.name == "a: b, c"
    assert cfg.data.system_prompt == "{x}"


def test_values_are_typed():
    cfg = load_config(BASE, ["grpo.std_eps=1e-8", "validation.pass_k=[1, 2]", "data.system_prompt=null",
                             "cipo.enabled=false", "run.name='007'"])
    assert cfg.grpo.std_eps == pytest.approx(1e-8) and cfg.validation.pass_k == [1, 2]
    assert cfg.data.system_prompt is None and cfg.cipo.enabled is False and cfg.run.name == "007"


@pytest.mark.parametrize("override, expected", [
    ("run.output_dir=${run.nme}/x", "command line: run.output_dir: cannot resolve interpolation: Interpolation key "
                                    "'run.nme' not found (did you mean run.name"),
    ("cipo.templates.math={problem} {attempt}", "quote a value that holds braces"),
    ("~grpo.num_steps", "command line: grpo.num_steps: required key is missing"),
    ("~run.name", "command line (run.name; run.output_dir is from"),
    ("~grpo.nope", "command line: ~grpo.nope: no such key"),
    ("~grpo.num_steps=5", "command line: ~grpo.num_steps=5: the key holds 500"),
    ("grpo.num_steps=1,2", "a sweep is not supported"),
    ("++grpo.num_steps.x=1", "command line: grpo.num_steps: Input should be a valid integer"),
    ("run.output_dir=${run", "is not of the form key.sub=value"),
    ("run.output_dir=${oc.env:CIPO_NO_SUCH_VARIABLE}", "command line: run.output_dir: cannot resolve interpolation"),
    ("run.name=${run.name}", "command line: run.name: cannot resolve interpolation"),
    ("=3", "names no key"),
    ("~", "names no key"),
    ("", "is not of the form"),
    ("grpo@pkg=1", "@packages are not supported"),
    ('run.name="unclosed', "is not of the form"),
    ("grpo=3", "command line: grpo: Input should be a valid dictionary"),
    ("++x.y=1", "command line: x: unknown key"),
    # cross-field checks fail at the file's key; the command line set the other one
    ("cipo.rho.min=0.9", "command line (cipo.rho.min; cipo.rho.max is from"),
    ("loss.kl_beta=0.1", "command line (loss.kl_beta; policy is from"),
    ("data.train.kind=file", "command line (data.train.kind; data.train.file is from"),
    ("cipo.difficulty_low=0.9", "command line (cipo.difficulty_low; cipo.difficulty_high is from"),
])
def test_bad_command_line_is_one_clear_error_naming_the_command_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    message = str(err.value)
    assert expected in message
    assert all(line.startswith("command line") for line in message.splitlines()), message


@pytest.mark.parametrize("override", ["run.output_dir=${run.nme}/x", "cipo.templates.math={problem} {attempt}"])
def test_config_cli_answers_bad_overrides_without_a_traceback(override, capsys):
    assert config_main([str(BASE), override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("config error: command line")
