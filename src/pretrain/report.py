"""`pretrain report RUN...`: the curves of one or more runs as PNGs, and one self-contained HTML
page (plots embedded, the run's spec, final metrics, checkpoint list).

A run is a `pretrain run` folder (its `checkpoints/` holds the history) or any checkpoint location
(a folder or an object-storage URI with `metrics.jsonl`). The data drawn is also written to
`curves.json`, taken from the plotted lines themselves, so a reader (or a test) can compare the
figures with the logged numbers without reading pixels.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from pretrain.errors import UserError
from pretrain.metrics.history import MAX_HISTORY_BYTES, METRICS_FILE, check_history, current_records
from pretrain.storage.fs import is_local, local_path
from pretrain.storage.manifest import step_name, total_bytes

#: (file stem, title, y label, [(record key, line label)], log scale)
FIGURES: list[tuple[str, str, str, list[tuple[str, str]], bool]] = [
    ("loss", "Loss", "loss", [("loss", "train"), ("eval_loss", "eval")], False),
    ("lr", "Learning rate", "lr", [("lr", "lr")], False),
    ("grad_norm", "Gradient norm", "grad norm", [("grad_norm", "grad norm")], True),
    ("tokens_per_second", "Throughput", "tokens/s", [("tokens_per_second", "tokens/s")], False),
    ("mfu", "Model FLOPs utilisation", "MFU", [("mfu", "MFU")], False),
]


@dataclass
class Run:
    name: str
    location: str
    records: list[dict[str, Any]]
    final: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def job(self) -> dict[str, Any]:
        starts = [r for r in self.records if r.get("event") == "start" and isinstance(r.get("job"), dict)]
        return starts[-1]["job"] if starts else {}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one key, one value per step (the last logged wins)."""
        points: dict[int, float] = {}
        for r in self.records:
            value = _value(r, key)
            if r.get("event") is None and isinstance(value, int | float) and "step" in r:
                points[int(r["step"])] = float(value)
        steps = sorted(points)
        return steps, [points[s] for s in steps]


def _locate(arg: str) -> str:
    """The checkpoint location of a run argument (a run folder or a checkpoint location)."""
    if is_local(arg):
        path = local_path(arg)
        if not path.exists():
            raise UserError(f"{arg}: no such folder")
        for candidate in (path, path / "checkpoints"):
            if (candidate / METRICS_FILE).is_file():
                return str(candidate)
        raise UserError(
            f"{arg}: no {METRICS_FILE} here or in {arg}/checkpoints (is it a run folder or a checkpoint location?)"
        )
    return arg.rstrip("/")


def _read(location: str, rel: str, limit: int = MAX_HISTORY_BYTES) -> bytes | None:
    """A file of the location, or None; refuses one larger than `limit`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{location}/{rel}")
    try:
        size = fs.size(root)
    except FileNotFoundError:
        return None
    if size is not None and size > limit:
        raise UserError(f"{location}/{rel}: {size} bytes, more than the {limit} a report reads")
    return bytes(fs.cat_file(root))


def load_run(arg: str) -> Run:
    location = _locate(arg)
    raw = _read(location, METRICS_FILE)
    if raw is None:
        raise UserError(f"{location}: no {METRICS_FILE} (has the run logged a step yet?)")
    parsed, skipped = check_history(raw.decode("utf-8", "replace"))
    if skipped:
        first = "; ".join(f"line {n}: {why}" for n, why in skipped[:3])
        click.echo(f"warning: {location}/{METRICS_FILE}: skipped {len(skipped)} record(s) ({first})", err=True)
    records = current_records(parsed)
    if not records:
        raise UserError(f"{location}/{METRICS_FILE}: no records")
    final_raw = _read(location, "final/metrics.json", 2**20)
    final = json.loads(final_raw) if final_raw else {}
    from pretrain.storage.checkpoint import INTERACTIVE_ATTEMPTS, CheckpointStore

    store = CheckpointStore(location, workdir=Path(tempfile.mkdtemp(prefix="pretrain-report-")),
                            retry_attempts=INTERACTIVE_ATTEMPTS)  # fmt: skip
    checkpoints = []
    for s in store.steps():
        m = store.manifest(s)
        checkpoints.append({"name": step_name(s), "complete": m is not None,
                            "bytes": total_bytes(m) if m else None,
                            "time": m.get("time") if m else None})  # fmt: skip
    job = next((r.get("job") for r in reversed(records) if r.get("event") == "start"), None) or {}
    name = str((job.get("metadata") or {}).get("name") or Path(location.rstrip("/")).name)
    return Run(name=name, location=location, records=records, final=final, checkpoints=checkpoints)


SOURCE_PREFIX = "source_tokens:"
TIME_PREFIX = "time_spent:"


def _value(record: dict[str, Any], key: str) -> Any:
    """A record's value for `key`; `source_tokens:<uri>` reads one source of its token count,
    `time_spent:<kind>` one kind of the trainer's time."""
    for prefix, field_name in ((SOURCE_PREFIX, "source_tokens"), (TIME_PREFIX, "time_spent")):
        if key.startswith(prefix):
            values = record.get(field_name)
            return values.get(key.removeprefix(prefix)) if isinstance(values, dict) else None
    return record.get(key)


def _keys_of(runs: list[Run], field_name: str) -> list[str]:
    return sorted({str(k) for run in runs for r in run.records if isinstance(r.get(field_name), dict)
                   for k in r[field_name]})  # fmt: skip


def figures(runs: list[Run]) -> list[tuple[str, str, str, list[tuple[str, str]], bool]]:
    """FIGURES; the tokens each data source gave (one line per source) and where the trainer's
    time went (one line per kind, cumulative within an attempt: goodput), where logged."""
    out = list(FIGURES)
    uris = _keys_of(runs, "source_tokens")
    if uris:
        out.append(("sources", "Tokens by data source", "tokens", [(SOURCE_PREFIX + u, u) for u in uris], False))
    kinds = _keys_of(runs, "time_spent")
    if kinds:
        out.append(("time", "Where the trainer's time went (cumulative in each attempt)", "seconds",
                    [(TIME_PREFIX + k, k) for k in kinds], False))  # fmt: skip
    return out


def plot(runs: list[Run], out: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """One PNG per figure with data; returns what was drawn: figure -> line label -> {x, y}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn: dict[str, dict[str, dict[str, list[float]]]] = {}
    several = len(runs) > 1
    for stem, title, ylabel, keys, logy in figures(runs):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for run in runs:
            for key, label in keys:
                x, y = run.series(key)
                if x:
                    style = "o-" if key.startswith("eval_") else "-"
                    ax.plot(
                        x, y, style, markersize=3, linewidth=1.2, label=f"{run.name}: {label}" if several else label
                    )
        lines = ax.get_lines()
        if not lines:
            plt.close(fig)
            continue
        drawn[stem] = {str(ln.get_label()): _line_data(ln) for ln in lines}
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png")
        plt.close(fig)
    return drawn


def _line_data(line: Any) -> dict[str, list[float]]:
    """What a matplotlib line actually draws."""
    return {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}


def _megabytes(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def _html(runs: list[Run], out: Path, figures: list[str]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pretrain report</title><style>",
             "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}img{max-width:100%}",
             "</style></head><body><h1>pretrain report</h1>"]  # fmt: skip
    for stem in figures:
        data = base64.b64encode((out / f"{stem}.png").read_bytes()).decode()
        parts.append(f"<img alt='{stem}' src='data:image/png;base64,{data}'>")
    for run in runs:
        e = html.escape
        parts.append(f"<h2>{e(run.name)}</h2><p>{e(run.location)}</p>")
        if run.final:
            rows = "".join(f"<tr><th>{e(str(k))}</th><td>{v:.4g}</td></tr>" if isinstance(v, float)
                           else f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in run.final.items())  # fmt: skip
            parts.append(f"<h3>Final metrics</h3><table>{rows}</table>")
        if run.checkpoints:
            rows = "".join(
                f"<tr><td>{e(c['name'])}</td><td>{'complete' if c['complete'] else 'incomplete'}</td>"
                f"<td>{_megabytes(c['bytes'])}</td><td>{e(str(c['time'] or ''))}</td></tr>"
                for c in run.checkpoints
            )
            parts.append(
                f"<h3>Checkpoints</h3><table><tr><th>name</th><th>state</th><th>size</th><th>time</th></tr>{rows}</table>"
            )
        parts.append(f"<h3>Spec</h3><pre>{e(yaml.safe_dump(run.job, sort_keys=False))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _distinct_names(runs: list[Run]) -> None:
    """Runs of the same job are told apart by their folder (or location)."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            parts = run.location.rstrip("/").split("/")
            where = parts[-2] if parts[-1] == "checkpoints" and len(parts) > 1 else parts[-1]
            run.name = f"{run.name} ({where})"


def write_report(args: list[str], out: Path) -> Path:
    runs = [load_run(a) for a in args]
    _distinct_names(runs)
    out.mkdir(parents=True, exist_ok=True)
    drawn = plot(runs, out)
    (out / "curves.json").write_text(json.dumps(drawn))
    page = out / "report.html"
    page.write_text(_html(runs, out, list(drawn)))
    return page
