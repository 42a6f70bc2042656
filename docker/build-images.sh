#!/usr/bin/env bash
# `make images`: build the operator and CPU trainer images with podman (or docker).
#
#   docker/build-images.sh [operator] [trainer-cpu] [trainer]     (default: operator trainer-cpu)
#
# IMAGE_BASE: the base image. `local` (the default) builds a Debian bookworm base with python3
# from Debian packages (mmdebstrap), for machines that reach package registries but no image
# registry; any other value (python:3.11-slim-bookworm, the Dockerfiles' default) is used as is.
# IMAGE_PREFIX and IMAGE_TAG name the images (ghcr.io/pretrain-io and 0.1.0, the names the chart
# and the examples use and the release workflow publishes). Where pip reads wheels from a local
# folder (PIP_FIND_LINKS), the folder is mounted into the build and torch comes from it.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${IMAGE_PREFIX:-ghcr.io/pretrain-io}
TAG=${IMAGE_TAG:-0.1.0}
BASE=${IMAGE_BASE:-local}
LOCAL_BASE=localhost/pretrain-base:bookworm
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer-cpu)

if command -v podman >/dev/null 2>&1; then
  # crun refuses these machines' hybrid cgroups; runc works (see docs/images.md).
  engine=(podman --runtime runc)
  build_net=(--network=host)
  build_fmt=(--format docker)  # SHELL and the other Docker-only instructions, as docker builds them
elif command -v docker >/dev/null 2>&1; then
  engine=(docker)
  build_net=()
  build_fmt=()
else
  echo "error: make images needs podman or docker" >&2
  exit 1
fi

if [ "$BASE" = local ]; then
  BASE=$LOCAL_BASE
  if ! "${engine[@]}" image exists "$LOCAL_BASE" 2>/dev/null; then
    command -v mmdebstrap >/dev/null || { echo "error: IMAGE_BASE=local needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
    tmp=$(mktemp -d)
    echo "building the base image $LOCAL_BASE from Debian packages (mmdebstrap)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      bookworm "$tmp/rootfs.tar" http://deb.debian.org/debian
    "${engine[@]}" import --quiet "$tmp/rootfs.tar" "$LOCAL_BASE" >/dev/null
    rm -rf "$tmp"
  fi
fi

args=(--build-arg "BASE=$BASE")
if [ "${engine[0]}" = podman ]; then
  # pip inside the build uses this machine's pip settings: the CA of a TLS-inspecting proxy
  # (PIP_CERT) and a local wheel folder (PIP_FIND_LINKS, where torch's CPU build lies).
  pipdir=$(mktemp -d)
  trap 'rm -rf "$pipdir" ${tmp:-}' EXIT
  printf '[global]\n' > "$pipdir/pip.conf"
  if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$pipdir/ca.crt"
    printf 'cert = /run/pip/ca.crt\n' >> "$pipdir/pip.conf"
  fi
  if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
    printf 'find-links = %s\n' "$PIP_FIND_LINKS" >> "$pipdir/pip.conf"
    args+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "TORCH_INDEX=")
  fi
  args+=(-v "$pipdir:/run/pip:ro" --build-arg "PIP_CONFIG_FILE=/run/pip/pip.conf")
fi

for target in "${targets[@]}"; do
  case "$target" in
    operator) name=pretrain-operator ;;
    trainer-cpu) name=pretrain-trainer-cpu ;;
    trainer) name=pretrain-trainer ;;
    *) echo "error: unknown image $target (operator, trainer-cpu, trainer)" >&2; exit 1 ;;
  esac
  start=$(date +%s)
  "${engine[@]}" build --quiet "${build_fmt[@]}" "${build_net[@]}" "${args[@]}" -f "docker/$target.Dockerfile" -t "$PREFIX/$name:$TAG" . >/dev/null
  size=$("${engine[@]}" image inspect --format '{{.Size}}' "$PREFIX/$name:$TAG")
  echo "$PREFIX/$name:$TAG built in $(( $(date +%s) - start ))s, $(( size / 1000000 )) MB"
done
