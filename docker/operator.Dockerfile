# The operator: pretrain[operator] only (no torch), non-root, runs on a read-only root filesystem.
# Build from the repository root (`make images` does this with podman):
#   docker build -f docker/operator.Dockerfile -t ghcr.io/pretrain-io/pretrain-operator:0.1.0 .
# BASE is any Debian-like image with python3 (>= 3.11) and its venv module: the public
# python:3.11-slim-bookworm by default; `make images` on a machine without a registry passes a
# Debian base built from Debian packages (docker/build-images.sh).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# pip settings of the build machine (a proxy's CA, a local wheel folder): docker/build-images.sh
# mounts a pip.conf and names it here; by default none is read.
ARG PIP_CONFIG_FILE=/dev/null
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies come from pyproject.toml's `operator` extra (no second list here), installed
# before the source is copied: a source change rebuilds only the last layer (docker/requirements.py).
COPY pyproject.toml docker/requirements.py ./
# hadolint ignore=DL3013
RUN python3 -m venv --upgrade-deps /opt/venv \
    && python3 requirements.py pyproject.toml operator > requirements.txt \
    && pip install --no-compile -r requirements.txt \
    && useradd --uid 1000 --create-home pretrain
COPY README.md ./
COPY src ./src
RUN pip install --no-compile --no-deps . && rm -rf /src
WORKDIR /home/pretrain
USER 1000:1000
EXPOSE 8080 9090
ENTRYPOINT ["pretrain"]
CMD ["operator", "--all-namespaces"]
