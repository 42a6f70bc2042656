"""The metric names that cross a process boundary: the trainer serves them, the operator reads
them from node 0's endpoint (operator/progress.py). Named once here, torch-free and
prometheus_client-free, so the operator image imports them without the trainer's dependencies."""

from __future__ import annotations

STEP = "pretrain_step"
TOTAL_STEPS = "pretrain_total_steps"
TRAIN_LOSS = "pretrain_train_loss"
TOKENS_PER_SECOND = "pretrain_tokens_per_second"
#: Model FLOPs utilisation of the rank's device (0-1); never set (0) where the peak is unknown (CPU).
MFU = "pretrain_mfu_ratio"
#: A histogram: the operator reads its `_sum` and `_count` for the ETA.
STEP_DURATION = "pretrain_step_duration_seconds"
CHECKPOINT_STEP = "pretrain_checkpoint_last_verified_step"
CHECKPOINT_TIME = "pretrain_checkpoint_last_verified_timestamp_seconds"
#: One gauge per task metric (accuracy, f1...), told apart by the label EVAL_METRIC_LABEL.
EVAL_METRIC = "pretrain_eval_metric"
EVAL_METRIC_LABEL = "metric"
#: Unix time since which a storage call has been retried (0: none is): the operator then says the
#: job waits on its storage. The call and its last error are the labels of STORAGE_RETRYING_INFO.
STORAGE_RETRYING_SINCE = "pretrain_storage_retrying_since_timestamp_seconds"
STORAGE_RETRYING_INFO = "pretrain_storage_retrying_info"
STORAGE_RETRYING_LABELS = ("operation", "error")
#: Tokens the whole job trained on from each data source since the run began (label SOURCE_LABEL: the
#: source's URI): how the mixture's weights came out, in tokens.
SOURCE_TOKENS = "pretrain_data_source_tokens"
SOURCE_LABEL = "source"
#: Unix time of the trainer's last progress (a step, an evaluation, a checkpoint phase), and the
#: seconds without one that its watchdog calls a stall: the operator restarts a gang whose node 0
#: went that long without progress (its whole interpreter may be stuck, the watchdog with it).
HEARTBEAT = "pretrain_heartbeat_timestamp_seconds"
STALL_LIMIT = "pretrain_stall_limit_seconds"
#: What the loss guard found and did (label GUARD_KIND: nonfinite or spike), and the last step it
#: found one at: the operator turns a new one into a Warning event of the job.
GUARD_EVENTS = "pretrain_guard_events_total"
GUARD_KIND = "kind"
GUARD_LAST_STEP = "pretrain_guard_last_step"
#: Where a trainer's time went, by kind (label TIME_KIND: restart, training, recomputed,
#: checkpoint, evaluation): the operator adds it up into status.goodput.
TIME_SECONDS = "pretrain_time_seconds_total"
TIME_KIND = "kind"
