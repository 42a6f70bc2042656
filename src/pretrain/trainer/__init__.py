"""The trainer: what every worker process runs under torchrun (`python -m pretrain.trainer`)."""
