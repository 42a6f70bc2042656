# A CPU-only trainer (for kind and CI clusters without GPUs): examples/tiny-cpu.yaml uses it.
# Base images are pinned by exact version tag; add the digest (FROM image:tag@sha256:...) when
# publishing, from `docker buildx imagetools inspect`. Not built on the development machines (no Docker engine).
FROM python:3.11.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DS_ACCELERATOR=cpu
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" && pip install '.[trainer]' && rm -rf /src
RUN useradd --uid 1000 --create-home pretrain && mkdir /workspace && chown 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace
ENV HF_HOME=/workspace/hf TORCH_EXTENSIONS_DIR=/workspace/torch_extensions
