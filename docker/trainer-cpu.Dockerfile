# A CPU-only trainer (kind and CI clusters without GPUs; examples/tiny-cpu.yaml uses it).
# Build from the repository root (`make images` does this with podman):
#   docker build -f docker/trainer-cpu.Dockerfile -t ghcr.io/pretrain-io/pretrain-trainer-cpu:0.1.0 .
# torch's version is the pin in pyproject.toml's `trainer` extra, installed first from
# TORCH_INDEX (PyTorch's CPU wheels); an empty TORCH_INDEX takes it from pip's own settings
# (a local wheel folder through PIP_FIND_LINKS, as `make images` does here).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# pip settings of the build machine (a proxy's CA, a local wheel folder): docker/build-images.sh
# mounts a pip.conf and names it here; by default none is read.
ARG PIP_CONFIG_FILE=/dev/null
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH DS_ACCELERATOR=cpu
# DeepSpeed builds its CPU communication op with g++ (below, once; again only if it changes),
# against Python's headers (python:3.11-slim has them; Debian's python3 needs python3-dev).
# hadolint ignore=DL3008
RUN apt-get update \
    && headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    && dev="" && { [ -e "$headers/Python.h" ] || dev=python3-dev; } \
    && apt-get install -y --no-install-recommends g++ ${dev:+"$dev"} \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies come from pyproject.toml's `trainer` extra (no second list here), installed
# before the source is copied: a source change rebuilds only the last layers (seconds), not
# torch, DeepSpeed and the rest, nor DeepSpeed's CPU op (minutes). docker/requirements.py says so.
COPY pyproject.toml docker/requirements.py ./
# hadolint ignore=DL3013
RUN python3 -m venv --upgrade-deps /opt/venv \
    && python3 requirements.py pyproject.toml trainer > requirements.txt \
    && pip install --no-compile ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$(grep '^torch==' requirements.txt)" \
    && pip install --no-compile -r requirements.txt \
    && useradd --uid 1000 --create-home pretrain \
    && mkdir /workspace && chown 1000:1000 /workspace
# DeepSpeed's CPU communication op, compiled once here; the trainer copies it into the pod's
# TORCH_EXTENSIONS_DIR at launch instead of compiling it there (src/pretrain/trainer/extensions.py).
ENV PRETRAIN_PREBUILT_EXTENSIONS=/opt/pretrain/torch_extensions
RUN TORCH_EXTENSIONS_DIR="$PRETRAIN_PREBUILT_EXTENSIONS" python3 -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    && chmod -R a+rX "$PRETRAIN_PREBUILT_EXTENSIONS"
COPY examples /opt/pretrain/examples
COPY README.md ./
COPY src ./src
RUN pip install --no-compile --no-deps . && rm -rf /src
USER 1000:1000
WORKDIR /workspace
ENV HOME=/workspace HF_HOME=/workspace/hf TORCH_EXTENSIONS_DIR=/workspace/torch_extensions \
    MPLCONFIGDIR=/workspace/matplotlib
ENTRYPOINT []
CMD ["pretrain", "--help"]
