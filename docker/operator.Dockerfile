# The operator: slim Python, pretrain[operator] only (no torch), non-root, read-only root FS friendly.
# Base images are pinned by exact version tag; add the digest (FROM image:tag@sha256:...) when
# publishing, from `docker buildx imagetools inspect`. Not built on the development machines (no Docker engine).
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t pretrain-operator .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[operator]'

FROM python:3.11.11-slim-bookworm
RUN useradd --uid 1000 --create-home pretrain
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'pretrain[operator]' && rm -rf /wheels
USER 1000:1000
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080 9090
ENTRYPOINT ["pretrain"]
CMD ["operator", "--all-namespaces"]
