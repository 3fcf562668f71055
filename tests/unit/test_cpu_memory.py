"""CPU workers start with huge pages and kept freed memory (cluster.cpu_keep_memory; cipo_nemo/utils/cpu_memory.py).

The switch acts when a process started with its environment repeats an allocation with far fewer fresh pages, and
puts its large tensors on huge pages; without it glibc hands a freed 64 MiB tensor back to the OS and the next one
faults every 4 KiB page in.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cipo_nemo.config import load_config
from cipo_nemo.models import factory
from cipo_nemo.models.generation import ray_generation
from cipo_nemo.models.policy import megatron_policy
from cipo_nemo.utils.cpu_memory import GLIBC_KEEP_FREED_MEMORY, cpu_memory_environment

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
TENSOR_MIB = 64

# A step's allocation, repeated: allocates, touches and frees a 64 MiB tensor five times; prints the page faults of
# rounds 2-5 and the process's huge-page memory while the last tensor is alive.
REALLOCATE = f"""
import resource, torch
faults = 0
for round in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty({TENSOR_MIB} << 20, dtype=torch.uint8)
    tensor.fill_(1)
    if round:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if round < 4:
        del tensor
huge_kib = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
print(faults, huge_kib)
"""


def reallocate(extra_env: dict[str, str]) -> tuple[int, int]:
    # LD_PRELOAD too: vLLM's CPU platform adds libraries to this process's LD_PRELOAD once a test has built an engine
    env = {key: value for key, value in os.environ.items()
           if key not in ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD")}
    result = subprocess.run([sys.executable, "-c", REALLOCATE], env=env | extra_env, capture_output=True, text=True,
                            check=True, timeout=120)
    faults, huge_kib = result.stdout.split()
    return int(faults), int(huge_kib)


def test_environment_on_cpu_only_and_only_when_on():
    on_cpu = cpu_memory_environment(True, on_gpu=False, inherited={})
    assert on_cpu == {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": GLIBC_KEEP_FREED_MEMORY}
    assert cpu_memory_environment(True, on_gpu=True, inherited={}) == {}
    assert cpu_memory_environment(False, on_gpu=False, inherited={}) == {}


def test_the_users_glibc_tunables_come_last_so_they_win():
    env = cpu_memory_environment(True, on_gpu=False, inherited={"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"})
    assert env["GLIBC_TUNABLES"] == f"{GLIBC_KEEP_FREED_MEMORY}:glibc.malloc.mmap_max=8"


def test_a_repeated_allocation_faults_far_fewer_pages_in():
    kept, _ = reallocate(cpu_memory_environment(True, on_gpu=False, inherited={}))
    returned, _ = reallocate({})
    # glibc's default hands the freed tensor back: all 4 x 16384 pages fresh again. With the environment the memory
    # is kept (0-1 faults) or, depending on the heap's layout, at worst faulted in as 2 MiB pages (~544 a round).
    assert returned >= 4 * (TENSOR_MIB << 8) * 0.9, returned
    assert kept * 20 < returned, (kept, returned)


def test_large_tensors_go_on_huge_pages():
    thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp_mode.exists() or "[never]" in thp_mode.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    _, huge_kib = reallocate(cpu_memory_environment(True, on_gpu=False, inherited={}))
    assert huge_kib >= (TENSOR_MIB // 2) << 10, huge_kib


class Recording:
    """Stands in for MegatronPolicy and RayGeneration: records the environment their actors would start with."""

    seen: list[dict] = []

    def __init__(self, **kwargs) -> None:
        Recording.seen.append(kwargs["env_vars"])


@pytest.mark.parametrize("keep", [True, False])
def test_policy_and_generation_actors_start_with_it_on_cpu(monkeypatch, tmp_path, keep):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(BASE_CONFIG, [f"policy.model_name={tmp_path}", "policy.backend=megatron",
                                    "generation.backend=vllm", f"cluster.cpu_keep_memory={keep}"])
    monkeypatch.setattr(megatron_policy, "MegatronPolicy", Recording)
    monkeypatch.setattr(ray_generation, "RayGeneration", Recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Recording.seen = []
    factory.build_policy(cfg, cluster=None)
    factory.build_generation(cfg, cluster=None)
    assert len(Recording.seen) == 2
    for env_vars in Recording.seen:
        assert ("GLIBC_TUNABLES" in env_vars and env_vars["THP_MEM_ALLOC_ENABLE"] == "1") == keep, env_vars
        assert "OMP_NUM_THREADS" in env_vars
