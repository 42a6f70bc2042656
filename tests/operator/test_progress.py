"""status.progress from node 0's exposition: what the trainer's TrainerMetrics serves, read by the
operator's parser (prometheus_client's), through the metric names both share."""

from __future__ import annotations

from datetime import datetime

from pretrain.metrics.trainer import Labels, TrainerMetrics
from pretrain.operator.progress import evaluation_from, parse_metrics, progress_from


def test_the_operator_reads_what_the_trainer_serves() -> None:
    from prometheus_client import generate_latest

    m = TrainerMetrics(Labels('job "a"\\b', "ns", 0, 2), port=None)
    assert "pretrain_step" not in parse_metrics(generate_latest(m.registry).decode()), "no step before it is known"
    m.begin(100, 0)
    m.observe_step(step=40, loss=2.5, lr=1e-3, grad_norm=1.0, tokens=4096, samples=32, seconds=0.5, mfu=None)
    m.observe_step(step=41, loss=2.25, lr=1e-3, grad_norm=1.0, tokens=4096, samples=32, seconds=1.5, mfu=None)
    m.observe_checkpoint(seconds=1.0, nbytes=10, failures=0, step=40, when=1_700_000_000.0)
    m.observe_eval({"accuracy": 0.75, "macro_f1": 0.5, "loss": 1.0})
    m.observe_sources({"s3://b/web/*.jsonl": 3072, 'gs://b/code "x"': 1024})
    samples = parse_metrics(generate_latest(m.registry).decode())
    progress, checkpoint = progress_from(samples, datetime(2026, 1, 1))
    assert progress["step"] == 41 and progress["totalSteps"] == 100 and progress["percent"] == 41.0
    assert progress["loss"] == 2.25 and progress["etaSeconds"] == 59.0, "mean step 1 s x 59 steps left"
    assert "mfu" not in progress, "no MFU where the device's peak is unknown"
    m.observe_step(step=42, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=4096, samples=32, seconds=1.0, mfu=0.3817)
    assert progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]["mfu"] == 0.3817
    assert checkpoint == {"step": 40, "time": "2023-11-14T22:13:20Z"}
    assert evaluation_from(samples) == {"accuracy": 0.75, "macro_f1": 0.5}
    assert progress["sourceTokens"] == {"s3://b/web/*.jsonl": 3072, 'gs://b/code "x"': 1024}
    for failures in (2, 2, 3):  # the store's running count: the counter follows it, never double-counts
        m.observe_checkpoint(seconds=1.0, nbytes=10, failures=failures, step=40, when=1_700_000_000.0)
    assert parse_metrics(generate_latest(m.registry).decode())["pretrain_checkpoint_failures_total"] == 3
    m.close()


def test_an_exposition_the_parser_refuses_gives_no_samples() -> None:
    assert parse_metrics('pretrain_step{rank="0" 5\n') == {}
    assert parse_metrics("") == {}


def test_a_storage_call_being_retried_reaches_the_status_and_clears() -> None:
    """Issue 27 item 7: an unreachable checkpoint endpoint showed Running "all pods running" for
    minutes per attempt. The trainer serves the call it is retrying, with its error, from the
    start (before any step), and nothing once the call is done."""
    from prometheus_client import generate_latest

    from pretrain.storage.fs import with_retries

    m = TrainerMetrics(Labels("j", "ns", 0, 1), port=None)
    seen: list[dict[str, object] | None] = []

    def refused() -> None:
        seen.append(progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]
                    .get("storageRetrying"))  # fmt: skip
        if len(seen) < 3:
            raise ConnectionRefusedError(111, 'Could not connect to the endpoint URL: "http://s3:1/b/lease"')

    with_retries("take the checkpoint lease", refused, base_delay=0.01)
    assert seen[0] is None, "the first try is not a retry"
    assert seen[2] == {"since": seen[1]["since"], "operation": "take the checkpoint lease",  # type: ignore[index]
                       "error": "ConnectionRefusedError: [Errno 111] Could not connect to the endpoint URL: "
                                '"http://s3:1/b/lease"'}, seen  # fmt: skip
    after = progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]
    assert "storageRetrying" not in after and "step" not in after


def test_the_heartbeat_is_served_only_once_it_beats() -> None:
    from prometheus_client import generate_latest

    m = TrainerMetrics(Labels("j", "ns", 0, 1), port=None)
    m.begin(10, 0)
    first = progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]
    assert "heartbeat" not in first, "no 1970 heartbeat before the first beat"
    m.observe_heartbeat(1_700_000_000.0, 900.0)
    beat = progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]["heartbeat"]
    assert beat == {"time": "2023-11-14T22:13:20Z", "limitSeconds": 900}


def test_the_loss_guards_findings_are_counted_over_kinds() -> None:
    from prometheus_client import generate_latest

    m = TrainerMetrics(Labels("j", "ns", 0, 1), port=None)
    m.begin(10, 0)
    assert "guard" not in progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]
    m.observe_guard("nonfinite", 7)
    m.observe_guard("spike", 9)
    m.observe_guard("spike", 12)
    found = progress_from(parse_metrics(generate_latest(m.registry).decode()), datetime(2026, 1, 1))[0]["guard"]
    assert found == {"events": 3, "lastStep": 12}
