# cipo_nemo GPU image: Python 3.12, CUDA torch, official vLLM, Transformer Engine (its PyTorch extension compiled
# here), megatron-core, megatron-bridge, Ray: the GPU profile of scripts/install.sh --gpu in /opt/venv.
#   docker build -t cipo_nemo:gpu .                      (from the repository root; the TE compile takes a while)
#   docker build --build-arg MAX_JOBS=4 -t cipo_nemo:gpu .   (fewer parallel compile jobs if the build runs out of memory)
# For Slurm + Pyxis turn it into an enroot image and pass it to the launcher (docs/launching.md, "Containers"):
#   enroot import -o cipo_nemo.sqsh dockerd://cipo_nemo:gpu
#   CONTAINER_IMAGE=$PWD/cipo_nemo.sqsh CONTAINER_MOUNTS=$PWD:$PWD sbatch slurm/cipo_70b.sh
#
# Base: CUDA 13.0 development image with cuDNN on Ubuntu 24.04. CUDA 13.0 is what PyPI's torch 2.13.0 is built with
# (requirements-gpu.txt); nvcc and the cuDNN headers are what Transformer Engine's extension compiles with; Ubuntu
# 24.04's system Python is 3.12. Not an NGC PyTorch image: those ship their own torch build, which vllm's exact
# torch==2.13.0 pin would replace with a second copy.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# Parallel compile jobs of the Transformer Engine build (each can take several GB of host memory).
ARG MAX_JOBS=8
ENV MAX_JOBS=${MAX_JOBS} \
    NVTE_FRAMEWORK=pytorch \
    DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0

# python3.12-dev and build-essential: the source-only packages (TE's extension, pycosat) compile against them;
# cmake/ninja/git: TE's build; util-linux (setpriv): the code sandbox runs programs as another user.
# RDMA userspace: NCCL's InfiniBand / RoCE transport loads libibverbs and the NIC's verbs provider (mlx5 and others
# in ibverbs-providers) at run time; without them NCCL falls back to TCP sockets between nodes. ibverbs-utils
# (ibv_devinfo) shows what the container sees. The node's RDMA kernel drivers (and nvidia-peermem for GPUDirect
# RDMA) come from the host.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential \
        cmake ninja-build git util-linux ca-certificates \
        rdma-core libibverbs1 ibverbs-providers ibverbs-utils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cipo_nemo
# The dependency layers first, so that a code change does not rebuild Transformer Engine.
COPY requirements-gpu.txt requirements-nodeps.txt ./
COPY scripts/install.sh scripts/install.sh
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet "$(grep -E '^torch==' requirements-gpu.txt)" \
    && /opt/venv/bin/pip install --quiet --no-build-isolation -r requirements-gpu.txt \
    && /opt/venv/bin/pip install --quiet --no-deps -r requirements-nodeps.txt

COPY . .
# What scripts/install.sh --gpu does, minus the steps done above (pip finds them satisfied): the project itself.
RUN PYTHON=python3.12 VENV_DIR=/opt/venv bash scripts/install.sh --gpu
ENV PATH=/opt/venv/bin:${PATH}
