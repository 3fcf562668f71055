"""The `cipo-nemo` console script and `python -m cipo_nemo --help`: subcommands run their module as `python -m`
would, and the help answers without importing the heavy libraries."""

import subprocess
import sys
from pathlib import Path

from cipo_nemo import cli
from cipo_nemo.__main__ import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[2]
# what a training run loads; before the fix, --help loaded sympy and math_verify (the verifier), pydantic and
# omegaconf (the config) through the preflight's imports
HEAVY = {"torch", "ray", "vllm", "megatron", "transformers", "sympy", "math_verify", "pydantic", "omegaconf"}

IMPORTED_AFTER_HELP = """
import runpy, sys
sys.argv = ["cipo-nemo", "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as done:
    assert done.code in (0, None), done.code
print(" ".join(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def _top_level_modules_after_help(module: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", IMPORTED_AFTER_HELP.format(module=module)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return set(result.stdout.strip().splitlines()[-1].split())


def test_help_imports_no_heavy_library():
    for module in ("cipo_nemo", "cipo_nemo.cli"):
        imported = _top_level_modules_after_help(module)
        assert "cipo_nemo" in imported  # the probe did run the entry point
        assert imported & HEAVY == set(), module


def test_default_config_ships_inside_the_package():
    package = Path(cli.__file__).resolve().parent
    assert DEFAULT_CONFIG.is_file()
    assert DEFAULT_CONFIG.parent == package / "conf"


def test_config_subcommand_prints_the_resolved_config(capsys):
    assert cli.main(["config", str(REPO / "conf" / "grpo_base.yaml"), "grpo.num_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "num_steps: 3" in out and "enabled: false" in out


def test_subcommand_gets_its_arguments_and_exit_status(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_entry.py").write_text("import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", "fake_entry")
    assert cli.main(["fake", "a", "--b=1"]) == 3
    assert capsys.readouterr().out.strip() == "['a', '--b=1']"


def test_absent_subcommand_module_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", "cipo_nemo.no_such_module")
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "cipo-nemo fake: cipo_nemo.no_such_module is not part of this installation\n"



def test_samples_subcommand_runs_the_samples_reader(capsys):
    assert cli.main(["samples", "--help"]) == 0
    assert "--kind" in capsys.readouterr().out  # python -m cipo_nemo.samples's own usage
