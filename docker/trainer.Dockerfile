# The trainer: CUDA PyTorch base, pretrain[trainer] with DeepSpeed, non-root.
# Base images are pinned by exact version tag; add the digest (FROM image:tag@sha256:...) when
# publishing, from `docker buildx imagetools inspect`. Not built on the development machines (no Docker engine).
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t pretrain-trainer .
# DeepSpeed's CPU ops are prebuilt (no compiler needed at run time); CUDA ops JIT-build on first use.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# torch comes from the base image: install the rest without touching it.
RUN pip install --no-deps . && pip install "deepspeed==0.19.8" "transformers==5.24.0" "datasets==5.2.0" \
    "tokenizers==0.23.3" "prometheus-client==0.26.0" "fsspec==2026.9.0" "s3fs==2026.9.0" "aiobotocore==3.10.0" \
    "gcsfs" "pyarrow" "pydantic>=2.7,<3" "pyyaml>=6" "click>=8.1" \
    && rm -rf /src
RUN useradd --uid 1000 --create-home pretrain && mkdir /workspace && chown 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace
ENV HF_HOME=/workspace/hf TORCH_EXTENSIONS_DIR=/workspace/torch_extensions
ENTRYPOINT []
CMD ["torchrun", "--help"]
