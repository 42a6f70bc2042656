"""What the two language-modelling tasks share: packed text, labels made by the collator, the
mean loss (and perplexity) as their score."""

from __future__ import annotations

from pretrain.tasks import Task


class LanguageModelling(Task):
    """Packed text in, the mean loss (and perplexity) out: nothing task-specific to build."""
