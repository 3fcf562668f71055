"""NeMo-Run recipes (recipes/cipo.py): the local recipe trains a tiny model for real through NeMo-Run; the Slurm
recipe renders, without a cluster, an sbatch script whose batch shell becomes slurm/ray_on_slurm.sh with the preset
and the overrides."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.models.tiny import build_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("cipo_recipes", REPO / "recipes" / "cipo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    import nemo_run.config

    # NeMo-Run runs local commands through invoke, which reads stdin; pytest's captured stdin raises on read
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    home = tmp_path / "nemo_run"
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    previous = nemo_run.config.get_nemorun_home()
    nemo_run.config.set_nemorun_home(str(home))  # read once at import: set it for this test
    yield home
    nemo_run.config.set_nemorun_home(previous)


def test_every_recipe_preset_matches_its_config(recipes):
    assert set(recipes.PRESETS) >= {"llama3_70b_math", "llama3_70b_math_fp8", "grpo_llama3_70b_math", "qwen3_4b_math",
                                    "seed_coder_8b_code", "smollm2_cpu"}
    for preset in recipes.PRESETS.values():
        cfg = load_config(REPO / preset.config)
        if preset.gpus_per_node:
            assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (preset.nodes, preset.gpus_per_node)


@pytest.mark.slow  # the training loop, through NeMo-Run's local executor
def test_local_recipe_trains_a_tiny_model_through_nemo_run(recipes, tmp_path, nemorun_home):
    model_dir = build_tiny_model_dir(tmp_path / "model")
    run_dir = tmp_path / "run"
    overrides = [
        f"policy.model_name={model_dir}", "policy.backend=hf", "generation.backend=hf", "grpo.num_steps=1",
        "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2", "cipo.samples_per_anchor=2",
        "cipo.max_anchors_per_step=2", "generation.max_new_tokens=8", f"run.output_dir={run_dir}",
        "data.train.reasoning_gym.size=8", "checkpointing.save_hf_at_end=false", "logger.tensorboard=false",
        "logger.plot=false",
        "data.max_prompt_tokens=400",  # the default's system prompt is ~240 tokens in the tiny model's small BPE
    ]
    task, executor = recipes.local_recipe(recipes.PRESETS["smollm2_cpu"], overrides)
    assert "-m cipo_nemo --config conf/cipo_smollm2_cpu.yaml policy.model_name=" in task.inline
    state = recipes.run_local(task, executor, name="tiny")
    logs = "\n".join(path.read_text()[-3000:] for path in nemorun_home.rglob("combined.log"))
    assert state == "SUCCEEDED", logs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert "train/loss" in records[0]
    assert load_config(run_dir / "config.yaml").policy.model_name == str(model_dir)  # the overrides arrived


def test_slurm_recipe_renders_the_launcher_call(recipes, tmp_path):
    preset = recipes.PRESETS["llama3_70b_math"]
    overrides = ["grpo.num_steps=10", "run.name=with space"]
    task, executor = recipes.slurm_recipe(preset, overrides, account="acct", partition="batch",
                                          job_dir=str(tmp_path / "jobs"), container_image="nvcr.io/x/y:1")
    script = recipes.render_sbatch(task, executor, name="llama3_70b_math")
    for line in ["#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --signal=B:USR1@300",
                 "export CONFIG=conf/cipo_llama3_70b_math.yaml", "export CONTAINER_IMAGE=nvcr.io/x/y:1",
                 f"cd {REPO}", f"exec bash {REPO}/slurm/ray_on_slurm.sh grpo.num_steps=10 'run.name=with space'"]:
        assert line in script.splitlines(), line
    # the launcher replaces the batch shell before NeMo-Run's own srun line
    assert script.index("exec bash") < script.index("\nsrun ")
    assert script.startswith("# submitted with: sbatch --requeue --parsable")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_recipe_cli_dryrun_prints_the_sbatch_script(recipes, capsys, tmp_path):
    assert recipes.main(["--preset", "qwen3_4b_math", "--dry-run", "--job-dir", str(tmp_path), "grpo.num_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in out and "export CONFIG=conf/cipo_qwen3_4b_math.yaml" in out
    assert "slurm/ray_on_slurm.sh grpo.num_steps=3" in out


def test_recipe_validates_overrides_before_rendering(recipes, capsys, tmp_path):
    job_dir = tmp_path / "jobs"
    assert recipes.main(["--preset", "qwen3_4b_math", "--dryrun", "--job-dir", str(job_dir), "grpo.num_stepz=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no sbatch script
    assert captured.err.startswith("config error: command line: grpo.num_stepz: no such key (did you mean grpo.num_steps")
    assert not job_dir.exists()  # nothing was prepared for a job
