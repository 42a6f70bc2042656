# The GPU trainer: torch's CUDA wheel at the pin in pyproject.toml (the wheel brings its CUDA
# runtime, cuDNN and NCCL as pip packages), pretrain[trainer] with DeepSpeed, non-root.
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/pretrain-io/pretrain-trainer:0.1.0 .
# build-essential lets DeepSpeed JIT-build its CPU ops (Adam for optimizer offload) on first use;
# CUDA ops that need nvcc are not used by the default recipe (torch's AdamW).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# pip settings of the build machine (a proxy's CA, a local wheel folder): docker/build-images.sh
# mounts a pip.conf and names it here; by default none is read.
ARG PIP_CONFIG_FILE=/dev/null
ARG TORCH_INDEX=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    && dev="" && { [ -e "$headers/Python.h" ] || dev=python3-dev; } \
    && apt-get install -y --no-install-recommends build-essential ${dev:+"$dev"} \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies first, the source last: a source change rebuilds seconds, not torch
# (docker/requirements.py, as in trainer-cpu.Dockerfile).
COPY pyproject.toml docker/requirements.py ./
# hadolint ignore=DL3013
RUN python3 -m venv --upgrade-deps /opt/venv \
    && python3 requirements.py pyproject.toml trainer > requirements.txt \
    && pip install --no-compile ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$(grep '^torch==' requirements.txt)" \
    && pip install --no-compile -r requirements.txt \
    && useradd --uid 1000 --create-home pretrain \
    && mkdir /workspace && chown 1000:1000 /workspace
COPY README.md ./
COPY src ./src
RUN pip install --no-compile --no-deps . && rm -rf /src
USER 1000:1000
WORKDIR /workspace
ENV HOME=/workspace HF_HOME=/workspace/hf TORCH_EXTENSIONS_DIR=/workspace/torch_extensions
ENTRYPOINT []
CMD ["torchrun", "--help"]
