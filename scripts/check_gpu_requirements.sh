#!/usr/bin/env bash
# Prove that the GPU profile (requirements-gpu.txt, plus requirements-nodeps.txt as installed with --no-deps) resolves
# together for Linux x86_64 / CPython 3.12, from any machine: pip's resolver in --dry-run mode for that platform
# (--platform/--python-version/--implementation cp/--only-binary=:all:), in a throwaway venv with a pinned pip.
# Nothing is installed. It names the packages PyPI ships as source only (Transformer Engine's PyTorch extension) and
# who builds them; it prints how long it took and how much it downloaded (index pages and wheel metadata, not wheels)
# and fails above a cap. Details: scripts/gpu_requirements_dry_run.py. Runs in CI (.ci/run).
#   bash scripts/check_gpu_requirements.sh
# Environment: PYTHON (any Python >= 3.9 with venv; default python3), PIP_INDEX_URL (default PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_VERSION=26.3  # the resolver whose answer this is; --use-feature=fast-deps exists in it
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Only the index counts: no pip config file, no local wheel folders or extra indexes that a cluster would not have.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_NO_INDEX PIP_TARGET PIP_PREFIX
"${PYTHON:-python3}" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --no-cache-dir "pip==$PIP_VERSION"
"$WORK/venv/bin/python" scripts/gpu_requirements_dry_run.py --repo . --work "$WORK" \
    --index "${PIP_INDEX_URL:-https://pypi.org/simple}"
