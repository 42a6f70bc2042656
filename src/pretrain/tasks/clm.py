"""clm: predict the next token (causal language modelling); needs a causal family."""

from __future__ import annotations

from pretrain.tasks._lm import LanguageModelling


class CausalLM(LanguageModelling):
    name = "clm"
    model_class = "AutoModelForCausalLM"
    loss_type = "ForCausalLM"


TASK = CausalLM()
