"""The operator at scale, against the Kubernetes API emulator (tests/kubeapi): `pretrain operator`
in its own process, as the chart runs it, with its default intervals.

Prints, each beside its target:
- seconds from `kubectl apply` of 100 jobs to all their pods created;
- steady-state API requests per job per minute (every request the emulator serves while all jobs
  run and nothing happens, over one full resync period of the operator);
- reconcile latency p50/p99 (the operator's own histogram, interpolated within buckets as
  Prometheus' histogram_quantile does);
- the operator's resident memory;
- failure-to-new-gang latency (a pod fails; the new attempt's pods exist; backoff set to 0):
  median of several.

The emulator runs in this process; it skips the official-schema check of built-in objects here
(tests keep it on), so that the numbers are the operator's, not the emulator's validation. Pods
are "run" by writing their status straight into the emulator's store (the kubelet is not what is
measured); the operator sees those writes as watch events like any other.

    python bench/operator_scale.py                  # 1,000 jobs of 8 nodes (about 10 minutes)
    python bench/operator_scale.py --jobs 200 --window 60 --reconcile-interval 60   # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver  # noqa: E402
from tests.kubeapi.server import ApiServer  # noqa: E402
from tests.kubeapi.store import Store  # noqa: E402


def job_doc(name: str, nodes: int, backoff: int = 10) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    doc["spec"]["resources"].update({"nodes": nodes, "procsPerNode": 1})
    doc["spec"]["training"]["globalBatchSize"] = 8 * nodes
    doc["spec"]["checkpoint"]["uri"] = f"s3://bench/{name}"
    doc["spec"]["runPolicy"] = {"restartBackoffSeconds": backoff}
    return doc


def count(api: ApiServer, plural: str, group: str = "") -> int:
    return api.call(lambda s: len(s.objects.get((group, plural), {})))


def run_pending(store: Store) -> int:
    """Bind and mark Running every Pending pod (what a scheduler and kubelets would do)."""
    res = store.resources[("", "pods")]
    pending = [o["metadata"]["name"] for o in store.objects[("", "pods")].values()
               if o["status"].get("phase") == "Pending" and not o["metadata"].get("deletionTimestamp")]  # fmt: skip
    for name in pending:
        if not store.get(res, "default", name)["spec"].get("nodeName"):
            store.bind("default", name, "node-0")
        store.update(res, "default", name, {"status": {"phase": "Running", "podIP": "127.0.0.2"}}, subresource="status")
    return len(pending)


def running_jobs(store: Store) -> int:
    return sum(1 for o in store.objects[("pretrain.io", "pretrainjobs")].values()
               if (o.get("status") or {}).get("phase") == "Running")  # fmt: skip


def confirm_deletions(store: Store) -> int:
    """The kubelet's last word on pods being deleted (their containers have stopped)."""
    res = store.resources[("", "pods")]
    gone = [
        o["metadata"]["name"] for o in store.objects[("", "pods")].values() if o["metadata"].get("deletionTimestamp")
    ]
    for name in gone:
        store.delete(res, "default", name, grace=0)
    return len(gone)


def has_pods(store: Store, prefix: str, n: int) -> bool:
    """Whether pods <prefix>0 .. <prefix>(n-1) exist (a look-up, no copy of every pod)."""
    pods = store.objects[("", "pods")]
    return all(("default", f"{prefix}{i}") in pods for i in range(n))


def job_phase(store: Store, name: str) -> str | None:
    job = store.objects[("pretrain.io", "pretrainjobs")].get(("default", name)) or {}
    return (job.get("status") or {}).get("phase")


def wait(predicate: Any, timeout: float, what: str, period: float = 0.2) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(period)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile over cumulative (upper bound, count) buckets."""
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / max(c - prev_count, 1e-9))
        prev_le, prev_count = le, c
    return prev_le


def reconcile_buckets(port: int) -> list[tuple[float, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        if line.startswith("pretrain_operator_reconcile_duration_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--burst", type=int, default=100, help="jobs applied at once with kubectl (timed)")
    ap.add_argument("--reconcile-interval", type=float, default=300.0, help="the operator's resync (its default)")
    ap.add_argument("--window", type=float, default=None, help="steady-state window (default: one resync period)")
    ap.add_argument("--failures", type=int, default=5)
    args = ap.parse_args()
    window = args.window or args.reconcile_interval
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    work = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    api = start_apiserver(work / "api")
    api.call(lambda s: [setattr(r, "validate_builtin", False) for r in s.resources.values()])
    op = OperatorProcess(api, work / "operator.log", ["--reconcile-interval", str(args.reconcile_interval)]).start()
    kubectl = Kubectl(api)
    try:
        time.sleep(3)  # the operator's start-up (imports, discovery, first list)
        # 1. kubectl apply of a burst of jobs -> all their pods created
        burst = min(args.burst, args.jobs)
        manifest = yaml.safe_dump_all([job_doc(f"b{i:04d}", args.nodes) for i in range(burst)])
        t0 = time.monotonic()
        kubectl("apply", "-f", "-", stdin=manifest, timeout=600)
        wait(lambda: count(api, "pods") >= burst * args.nodes, 600, "the burst's pods")
        burst_seconds = time.monotonic() - t0
        print(
            f"kubectl apply of {burst} jobs -> all {burst * args.nodes} pods created: {burst_seconds:.1f} s", flush=True
        )

        # 2. the rest of the jobs, straight into the store; everything runs
        jobs_res = ("pretrain.io", "pretrainjobs")
        for i in range(burst, args.jobs):
            doc = job_doc(f"j{i:04d}", args.nodes)
            api.call(lambda s, d=doc: s.create(s.resources[jobs_res], "default", d))
        wait(lambda: count(api, "pods") >= args.jobs * args.nodes, 1800, "every job's pods", period=2)
        wait(lambda: api.call(run_pending) == 0 and api.call(running_jobs) == args.jobs, 1800, "every job Running",
             period=2)  # fmt: skip
        settle = 10.0
        time.sleep(settle)

        # 3. steady state: every request the operator makes over one resync period
        busy = reconcile_buckets(op.metrics_port)
        before = api.call(lambda s: len(s.requests))
        t1 = time.monotonic()
        time.sleep(window)
        requests = api.call(lambda s: len(s.requests)) - before
        per_job_minute = requests / args.jobs / ((time.monotonic() - t1) / 60)
        print(f"steady state: {requests} requests in {time.monotonic() - t1:.0f} s for {args.jobs} jobs", flush=True)

        import psutil

        assert op.proc is not None
        rss = psutil.Process(op.proc.pid).memory_info().rss / 2**20
        buckets = reconcile_buckets(op.metrics_port)
        steady = [(le, c - b) for (le, c), (_, b) in zip(buckets, busy, strict=True)]

        # 4. failure -> new gang, backoff 0, one job at a time
        latencies = []
        for k in range(args.failures):
            name = f"fail{k}"
            doc = job_doc(name, 2, backoff=0)
            api.call(lambda s, d=doc: s.create(s.resources[jobs_res], "default", d))
            wait(lambda n=name: api.call(has_pods, f"{n}-a1-n", 2), 120, "pods")
            api.call(run_pending)
            wait(lambda n=name: api.call(job_phase, n) == "Running", 120, "Running")
            t2 = time.monotonic()
            api.call(lambda s, n=name: s.update(s.resources[("", "pods")], "default", f"{n}-a1-n1", {"status": {
                "phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": False,
                                                          "restartCount": 0, "state": {"terminated": {"exitCode": 1}}}]}},
                subresource="status"))  # fmt: skip
            wait(lambda n=name: api.call(confirm_deletions) >= 0 and api.call(has_pods, f"{n}-a2-n", 2), 120,
                 "the new gang", period=0.02)  # fmt: skip
            latencies.append(time.monotonic() - t2)
    finally:
        op.stop()
        api.stop()

    rows = [
        (f"kubectl apply of {burst} jobs -> all {burst * args.nodes} pods created", f"{burst_seconds:.1f} s", "< 30 s"),
        (f"steady-state API requests per job per minute ({args.jobs} jobs x {args.nodes} nodes, "
         f"{window:.0f} s window, resync {args.reconcile_interval:.0f} s)", f"{per_job_minute:.2f}", "<= 2"),
        (f"reconcile latency p50 / p99, steady state ({int(steady[-1][1])} reconciles)",
         f"{quantile(0.5, steady) * 1000:.1f} / {quantile(0.99, steady) * 1000:.1f} ms", "p99 < 50 ms"),
        (f"reconcile latency p50 / p99, all ({int(buckets[-1][1])}, creations included)",
         f"{quantile(0.5, buckets) * 1000:.1f} / {quantile(0.99, buckets) * 1000:.1f} ms", ""),
        ("operator resident memory", f"{rss:.0f} MiB", "< 400 MiB"),
        (f"pod failure -> new gang's pods (backoff 0), median of {len(latencies)}",
         f"{statistics.median(latencies) * 1000:.0f} ms (min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f})",
         "within a second"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for what, value, target in rows:
        print(f"{what:<{width}}  {value:>28}   {'target ' + target if target else ''}")


if __name__ == "__main__":
    main()
