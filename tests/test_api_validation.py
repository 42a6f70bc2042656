"""`pretrain validate`: every example passes; bad specs fail with one line naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pretrain.api import PretrainJob, load_job
from pretrain.api.validation import SpecError, apply_overrides
from pretrain.cli import main
from tests.conftest import EXAMPLES, ROOT

BASE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())


def mutate(path: str, value: Any) -> str:
    """The tiny example with one field set (value DELETE removes it), as YAML text."""
    doc = copy.deepcopy(BASE)
    keys = path.split(".")
    node: Any = doc
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if value is DELETE:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return yaml.safe_dump(doc)


DELETE = object()

# (case id, YAML text, the field the one-line error must name)
BAD_SPECS: list[tuple[str, str, str]] = [
    ("empty-file", "", "empty"),
    ("only-comments", "# nothing here\n", "empty"),
    ("prepare-without-cache", mutate("spec.data.prepare", {"workers": 4}), "spec.data.prepare: needs spec.data.cacheUri"),
    ("prepare-zero-workers", mutate("spec.data.prepare", {"workers": 0}), "spec.data.prepare.workers"),
    ("stage-weights-count", mutate("spec.data.stages", [{"weights": [1, 2]}]), "spec.data.stages[0].weights: 2 weight(s)"),
    ("stage-weights-zero", mutate("spec.data.stages", [{"weights": [0]}]), "not all 0"),
    ("stage-order", mutate("spec.data.stages", [{"untilTokens": 500, "weights": [1]}, {"untilTokens": 100, "weights": [1]}]),
     "spec.data.stages[1].untilTokens: 100 is not after"),
    ("stage-open-middle", mutate("spec.data.stages", [{"weights": [1]}, {"weights": [1]}]),
     "spec.data.stages[0].untilTokens: required"),
    ("source-twice", mutate("spec.data.sources", [{"uri": "builtin://tinyshakespeare"}, {"uri": "builtin://tinyshakespeare"}]),
     "spec.data.sources[1].uri: the same as sources[0]"),
    ("not-a-mapping-list", "- a\n- b\n", "expected a mapping"),
    ("not-a-mapping-scalar", "just a string\n", "expected a mapping"),
    ("yaml-syntax", "spec: {model: [\n", "not valid YAML"),
    ("two-documents", yaml.safe_dump(BASE) + "---\n" + yaml.safe_dump(BASE), "documents"),
    ("wrong-api-version", mutate("apiVersion", "pretrain.io/v1"), "apiVersion"),
    ("wrong-kind", mutate("kind", "TrainJob"), "kind"),
    ("missing-metadata", mutate("metadata", DELETE), "metadata"),
    ("missing-name", mutate("metadata.name", DELETE), "metadata.name"),
    ("bad-name", mutate("metadata.name", "Tiny_CPU"), "metadata.name"),
    ("long-name", mutate("metadata.name", "a" * 60), "metadata.name"),
    ("missing-spec", mutate("spec", DELETE), "spec"),
    ("missing-data", mutate("spec.data", DELETE), "spec.data"),
    ("empty-sources", mutate("spec.data.sources", []), "spec.data.sources"),
    ("unknown-top-field", mutate("spec.trainig", {"maxSteps": 1}), "spec.trainig"),
    ("unknown-nested-field", mutate("spec.training.maxStep", 3), "spec.training.maxStep"),
    ("bad-family", mutate("spec.model.family", "mamba"), "spec.model.family"),
    ("unknown-preset", mutate("spec.model.preset", "huge"), "spec.model.preset"),
    ("no-preset-no-dims", mutate("spec.model.layers", DELETE), "spec.model.layers"),
    ("negative-layers", mutate("spec.model.layers", -2), "spec.model.layers"),
    ("string-heads", mutate("spec.model.heads", "four"), "spec.model.heads"),
    ("heads-not-dividing", mutate("spec.model.heads", 5), "spec.model.heads"),
    ("dropout-one", mutate("spec.model.dropout", 1.0), "spec.model.dropout"),
    ("seq-above-positions", mutate("spec.data.sequenceLength", 4096), "spec.data.sequenceLength"),
    ("zero-seq", mutate("spec.data.sequenceLength", 0), "spec.data.sequenceLength"),
    ("mlm-causal", mutate("spec.objective", {"type": "mlm"}), "spec.objective.type"),
    ("bad-objective", mutate("spec.objective", {"type": "seq2seq"}), "spec.objective.type"),
    ("mask-prob", mutate("spec.objective", {"maskProbability": 1.5}), "spec.objective.maskProbability"),
    ("pretrained-no-path", mutate("spec.tokenizer", {"type": "pretrained"}), "spec.tokenizer.path"),
    ("request-above-limit", mutate("spec.resources.requests", {"memory": "5Gi"}), "spec.resources.requests.memory"),
    ("bad-tokenizer", mutate("spec.tokenizer.type", "sentencepiece"), "spec.tokenizer.type"),
    ("vocab-below-bytes", mutate("spec.tokenizer", {"type": "bytes"}).replace("family: gpt2", "family: gpt2\n    vocabSize: 100"), "spec.model.vocabSize"),
    ("batch-indivisible", mutate("spec.training.globalBatchSize", 30), "spec.training.globalBatchSize"),
    ("micro-above-global", mutate("spec.training.microBatchSize", 64), "spec.training.globalBatchSize"),
    ("zero-micro", mutate("spec.training.microBatchSize", 0), "spec.training.microBatchSize"),
    ("negative-steps", mutate("spec.training.maxSteps", -5), "spec.training.maxSteps"),
    ("no-steps-no-budget", mutate("spec.training.maxSteps", DELETE), "spec.training.maxSteps"),
    ("tiny-token-budget", mutate("spec.training.maxSteps", DELETE).replace("training:", "training:\n    tokenBudget: 10"), "spec.training.tokenBudget"),
    ("bad-precision", mutate("spec.training.precision", "fp8"), "spec.training.precision"),
    ("fp16-on-cpu", mutate("spec.training.precision", "fp16"), "spec.training.precision"),
    ("zero-stage-4", mutate("spec.training.zero.stage", 4), "spec.training.zero.stage"),
    ("offload-params-stage2", mutate("spec.training.zero", {"stage": 2, "offloadParams": True}), "spec.training.zero.offloadParams"),
    ("offload-opt-stage0", mutate("spec.training.zero", {"stage": 0, "offloadOptimizer": True}), "spec.training.zero.offloadOptimizer"),
    ("negative-lr", mutate("spec.training.optimizer.lr", -0.1), "spec.training.optimizer.lr"),
    ("three-betas", mutate("spec.training.optimizer.betas", [0.9, 0.9, 0.9]), "spec.training.optimizer.betas"),
    ("beta-one", mutate("spec.training.optimizer.betas", [0.9, 1.0]), "spec.training.optimizer.betas"),
    ("zero-keep-last", mutate("spec.checkpoint.keepLast", 0), "spec.checkpoint.keepLast"),
    ("min-lr-above-lr", mutate("spec.training.schedule.minLr", 0.1), "spec.training.schedule.minLr"),
    ("bad-decay", mutate("spec.training.schedule.decay", "exponential"), "spec.training.schedule.decay"),
    ("bad-resume", mutate("spec.checkpoint.resume", "latest"), "spec.checkpoint.resume"),
    ("negative-resume", mutate("spec.checkpoint.resume", -1), "spec.checkpoint.resume"),
    ("bad-ckpt-scheme", mutate("spec.checkpoint.uri", "ftp2://host/dir"), "spec.checkpoint.uri"),
    ("ckpt-no-bucket", mutate("spec.checkpoint.uri", "s3:///path"), "spec.checkpoint.uri"),
    ("uri-credentials", mutate("spec.checkpoint.uri", "s3://AKIA:secret@bucket/x"), "spec.checkpoint.uri"),
    ("inline-secret-field", mutate("spec.checkpoint.secretAccessKey", "abc"), "spec.checkpoint.secretAccessKey"),
    ("inline-secret-option", mutate("spec.checkpoint.storageOptions", {"secret": "abc"}), "spec.checkpoint.storageOptions.secret"),
    ("inline-secret-env", mutate("spec.resources.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "spec.resources.env[0].name"),
    ("reserved-env", mutate("spec.resources.env", [{"name": "WORLD_SIZE", "value": "3"}]), "spec.resources.env[0].name"),
    ("bad-secret-name", mutate("spec.checkpoint.credentialsSecret", "My_Secret"), "spec.checkpoint.credentialsSecret"),
    ("bad-data-scheme", mutate("spec.data.sources.0.uri", "mysql://db/table"), "spec.data.sources[0].uri"),
    ("bad-format", mutate("spec.data.sources.0.format", "xml"), "spec.data.sources[0].format"),
    ("zero-weight", mutate("spec.data.sources.0.weight", 0), "spec.data.sources[0].weight"),
    ("split-one", mutate("spec.data.validationSplit", 1.0), "spec.data.validationSplit"),
    ("zero-nodes", mutate("spec.resources.nodes", 0), "spec.resources.nodes"),
    ("multi-node-local-ckpt", mutate("spec.resources.nodes", 2).replace("keepLast: 2", "keepLast: 2\n    uri: /tmp/ckpt"), "spec.checkpoint.uri"),
    ("multi-node-no-ckpt", mutate("spec.resources.nodes", 2), "spec.checkpoint.uri"),
    ("bad-quantity", mutate("spec.resources.requests", {"memory": "lots"}), "spec.resources.requests.memory"),
    ("bad-accelerator", mutate("spec.resources.accelerator", "tpu"), "spec.resources.accelerator"),
    ("bad-pull-policy", mutate("spec.resources.imagePullPolicy", "Sometimes"), "spec.resources.imagePullPolicy"),
    ("low-metrics-port", mutate("spec.monitoring", {"metricsPort": 80}), "spec.monitoring.metricsPort"),
    ("negative-restarts", mutate("spec.runPolicy", {"maxRestarts": -1}), "spec.runPolicy.maxRestarts"),
    ("backoff-above-cap", mutate("spec.runPolicy", {"restartBackoffSeconds": 600, "maxRestartBackoffSeconds": 60}), "spec.runPolicy.restartBackoffSeconds"),
    ("bad-clean-policy", mutate("spec.runPolicy", {"cleanPodPolicy": "Some"}), "spec.runPolicy.cleanPodPolicy"),
    ("tolerations-not-list", mutate("spec.resources.tolerations", "all"), "spec.resources.tolerations"),
    ("kv-heads-gpt2", mutate("spec.model.kvHeads", 2), "spec.model.kvHeads"),
    ("flash-on-cpu", mutate("spec.model.attention", "flash_attention_2"), "spec.model.attention"),
    ("rule-selects-nothing", mutate("spec.runPolicy", {"failurePolicy": {"rules": [{"action": "FailJob"}]}}), "spec.runPolicy.failurePolicy.rules[0]"),
    ("rule-in-zero", mutate("spec.runPolicy", {"failurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"values": [0, 1]}}]}}), "spec.runPolicy.failurePolicy.rules[0]"),
    ("rule-bad-action", mutate("spec.runPolicy", {"failurePolicy": {"rules": [{"action": "Ignore", "onReasons": ["Evicted"]}]}}), "spec.runPolicy.failurePolicy.rules[0].action"),
    ("rule-exit-code-256", mutate("spec.runPolicy", {"failurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"values": [256]}}]}}), "spec.runPolicy.failurePolicy.rules[0].onExitCodes.values[0]"),
    ("bad-scheduling-action", mutate("spec.runPolicy", {"schedulingTimeoutAction": "Retry"}), "spec.runPolicy.schedulingTimeoutAction"),
    # hostile and careless input (issue 16)
    ("lr-inf", mutate("spec.training.optimizer", {"lr": float("inf")}), "spec.training.optimizer.lr"),
    ("grad-clip-inf", mutate("spec.training.gradClip", float("inf")), "spec.training.gradClip"),
    ("weight-inf", mutate("spec.data.sources.0.weight", float("inf")), "spec.data.sources[0].weight"),
    ("lr-nan", mutate("spec.training.optimizer", {"lr": float("nan")}), "spec.training.optimizer.lr"),
    ("lr-huge", mutate("spec.training.optimizer", {"lr": 1e308}), "spec.training.optimizer.lr"),
    ("seed-huge", mutate("spec.training.seed", 1e23), "spec.training.seed"),
    ("vocab-huge", mutate("spec.model.vocabSize", 1e9), "spec.model.vocabSize"),
    ("eval-steps-huge", mutate("spec.training.evalSteps", 1e9), "spec.training.evalSteps"),
    ("label-value-long", mutate("spec.resources.labels", {"team": "x" * 100_000}), "spec.resources.labels"),
    ("label-key-bad", mutate("spec.resources.labels", {"bad key!": "x"}), "spec.resources.labels"),
    ("yaml-alias", "a: &x [1, 2]\nb: *x\n", "aliases"),
    ("yaml-duplicate-key", yaml.safe_dump(BASE) + "kind: PretrainJob\n", "duplicate key 'kind'"),
    ("secret-account-key", mutate("spec.checkpoint.storageOptions", {"account_key": "abc"}), "spec.checkpoint.storageOptions.account_key"),
    ("secret-connection-string", mutate("spec.checkpoint.storageOptions", {"connection_string": "abc"}), "spec.checkpoint.storageOptions.connection_string"),
    ("secret-sas", mutate("spec.checkpoint.storageOptions", {"sas_token": "abc"}), "spec.checkpoint.storageOptions.sas_token"),
    ("secret-endpoint-userinfo", mutate("spec.checkpoint.storageOptions", {"endpoint_url": "https://user:pass@minio:9000"}), "spec.checkpoint.storageOptions.endpoint_url"),
]  # fmt: skip


def test_rejected_values_are_never_echoed_whole_nor_secret(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(mutate("spec.resources.image", "r" * 5000))
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 1 and len(result.stderr) < 400 and "5002 characters" in result.stderr
    f.write_text(mutate("spec.resources.env", [{"name": "MY_VAR", "value": "hunter2" * 10_000}]))
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 1 and "hunter2" not in result.stderr, result.stderr


def test_enough_bad_specs() -> None:
    assert len(BAD_SPECS) >= 40
    assert len({case for case, _, _ in BAD_SPECS}) == len(BAD_SPECS)
    assert len({text for _, text, _ in BAD_SPECS}) == len(BAD_SPECS), "two cases share the same YAML"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    job = load_job(path)
    assert isinstance(job, PretrainJob)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout


@pytest.mark.parametrize(("case", "text", "field"), BAD_SPECS, ids=[c for c, _, _ in BAD_SPECS])
def test_bad_spec_one_line_error(case: str, text: str, field: str, tmp_path: Path) -> None:
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert field in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_real_process_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(mutate("spec.training.globalBatchSize", 30))
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "validate", str(f)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert (
        "spec.training.globalBatchSize: 30 is not divisible by microBatchSize x world size (8 x 2 = 16)" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_missing_file_and_usage_exit_codes(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "no such file" in result.stderr
    assert CliRunner().invoke(main, ["validate"]).exit_code == 2
    assert CliRunner().invoke(main, ["validate", "--bogus", "x"]).exit_code == 2


def test_set_overrides_apply_and_validate() -> None:
    path = ROOT / "examples" / "tiny-cpu.yaml"
    job = load_job(path, ["training.maxSteps=7", "spec.training.zero.stage=3", "data.sources.0.uri=/tmp/x.txt"])
    assert job.spec.training.max_steps == 7
    assert job.spec.training.zero.stage == 3
    assert job.spec.data.sources[0].uri == "/tmp/x.txt"
    assert load_job(path, ["data.sources[0].uri=/tmp/y.txt"]).spec.data.sources[0].uri == "/tmp/y.txt"  # helm style
    with pytest.raises(SpecError, match=r"^spec\.data\.sources\[0\]\.bogus: unknown field$"):
        load_job(path, ["data.sources[0].bogus=1"])
    with pytest.raises(SpecError, match=r"spec.training.microBatchSize"):
        load_job(path, ["training.microBatchSize=-1"])
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "training.globalBatchSize=33"])
    assert result.exit_code == 1
    assert "spec.training.globalBatchSize" in result.stderr
    for bad, field in [
        ("training", "--set"),
        ("data.sources.x.uri=a", "data.sources"),
        ("data.sources.9.uri=a", "sources"),
    ]:
        with pytest.raises(SpecError, match=field):
            load_job(path, [bad])


def test_override_values_are_yaml_scalars() -> None:
    doc: dict[str, Any] = {"spec": {}}
    apply_overrides(doc, ["a.b=3", "a.c=true", "a.d=0.5", "a.e=hello", "a.f=[1, 2]", "a.g="])
    assert doc["spec"]["a"] == {"b": 3, "c": True, "d": 0.5, "e": "hello", "f": [1, 2], "g": ""}


def test_defaults_by_family() -> None:
    job = load_job(ROOT / "examples" / "bert-base-mlm.yaml", ["objective.type=null"])
    assert job.spec.objective_type == "mlm"
    assert load_job(ROOT / "examples" / "tiny-cpu.yaml").spec.objective_type == "clm"


def test_camel_case_round_trip() -> None:
    job = load_job(ROOT / "examples" / "llama-1b-zero3.yaml")
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert "globalBatchSize" in dumped["spec"]["training"]
    assert PretrainJob.model_validate(dumped) == job
