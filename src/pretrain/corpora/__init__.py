"""Corpora and labelled tasks bundled with pretrain."""
