"""Elastic sizing and the preemption grace period: pure arithmetic over the spec, no API calls.

An elastic job (spec.resources.elastic) trains on any node count between minNodes and maxNodes
at which the global batch still divides into micro-batches (gradient accumulation absorbs the
rest), and a checkpoint written at one size resumes at another (trainer/universal.py).
"""

from __future__ import annotations

from pretrain.api.presets import MissingDimension, params_estimate, resolve_dims
from pretrain.api.spec import PretrainJobSpec

#: Bytes a checkpoint holds per parameter: fp32 weights and two Adam moments, plus 16-bit weights.
CHECKPOINT_BYTES_PER_PARAM = 14
#: What one node is assumed to write (its shard to local disk, then to object storage), bytes/s.
ASSUMED_WRITE_BYTES_PER_SECOND = 100 * 2**20
#: Room for the step in progress when the signal comes, and for the process to exit.
GRACE_MARGIN_SECONDS = 120
GRACE_CAP_SECONDS = 3600


def size_range(spec: PretrainJobSpec) -> tuple[int, int]:
    """(fewest, most) nodes; a job without `elastic` has one size."""
    r = spec.resources
    if r.elastic is None:
        return r.nodes, r.nodes
    return r.elastic.min_nodes, r.elastic.max_nodes or r.nodes


def sizes(spec: PretrainJobSpec) -> list[int]:
    """Every node count the job can train at, ascending."""
    low, high = size_range(spec)
    t, r = spec.training, spec.resources
    return [n for n in range(low, high + 1) if t.global_batch_size % (t.micro_batch_size * n * r.procs_per_node) == 0]


def fit(spec: PretrainJobSpec, available: int) -> int | None:
    """The most nodes the job can train at with `available` placeable nodes, or None (below minNodes)."""
    usable = [n for n in sizes(spec) if n <= available]
    return usable[-1] if usable else None


def termination_grace_seconds(spec: PretrainJobSpec) -> int:
    """The pod's terminationGracePeriodSeconds: the spec's, or time for one node to write its
    share of a checkpoint at a conservative 100 MiB/s, plus two minutes for the step in progress and the exit."""
    r = spec.resources
    if r.termination_grace_period_seconds is not None:
        return r.termination_grace_period_seconds
    try:
        params = params_estimate(resolve_dims(spec.model), spec.model.vocab_size or 50_257)
    except MissingDimension:
        params = 0
    share = params * CHECKPOINT_BYTES_PER_PARAM / r.nodes
    return int(min(GRACE_MARGIN_SECONDS + share / ASSUMED_WRITE_BYTES_PER_SECOND, GRACE_CAP_SECONDS))
