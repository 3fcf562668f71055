"""The Slurm model scripts are thin and consistent: a requeueable job that warns the batch shell before its time
limit, logs under logs/, and a default CONFIG whose cluster shape is the allocation's. The launcher refuses to run
outside an allocation. (tests/cluster runs the launcher itself under a real Slurm.)"""

import re
import subprocess
from pathlib import Path

import pytest

from cipo_nemo.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "cipo_70b.sh": ("conf/cipo_llama3_70b_math.yaml", 8),
    "grpo_70b.sh": ("conf/grpo_llama3_70b_math.yaml", 8),
    "cipo_qwen3_4b_math.sh": ("conf/cipo_qwen3_4b_math.yaml", 1),
    "cipo_seed_coder_8b_code.sh": ("conf/cipo_seed_coder_8b_code.yaml", 2),
}


def _sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M)) | {
        flag: "" for flag in re.findall(r"^#SBATCH --([\w-]+)$", text, flags=re.M)}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_model_script(name):
    config, nodes = SCRIPTS[name]
    text = (REPO / "slurm" / name).read_text()
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)
    options = _sbatch_options(text)
    assert int(options["nodes"]) == nodes
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert "requeue" in options and options["open-mode"] == "append"
    assert options["output"].startswith("logs/")
    assert f"export CONFIG=${{CONFIG:-{config}}}" in text  # CONFIG=... sbatch ... overrides it
    assert 'slurm/ray_on_slurm.sh" "$@"' in text
    cfg = load_config(REPO / config, [])
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (nodes, int(options["gpus-per-node"]))


def test_fp8_variant_has_the_70b_shape():
    cfg = load_config(REPO / "conf/cipo_llama3_70b_math_fp8.yaml", [])
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (8, 8)


def test_launcher_refuses_outside_an_allocation():
    env = {"PATH": "/usr/bin:/bin", "CONFIG": "conf/cipo_base.yaml"}
    result = subprocess.run(["bash", str(REPO / "slurm" / "ray_on_slurm.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "inside a Slurm allocation" in result.stderr
