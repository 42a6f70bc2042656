"""mlm: predict masked tokens (masked language modelling); needs a bidirectional family."""

from __future__ import annotations

from pretrain.tasks._lm import LanguageModelling


class MaskedLM(LanguageModelling):
    name = "mlm"
    model_class = "AutoModelForMaskedLM"
    loss_type = "ForMaskedLM"


TASK = MaskedLM()
