"""The model factory: a transformers model for the job's family and size, or its initFrom weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.api.presets import resolve_dims
from pretrain.api.spec import PretrainJobSpec
from pretrain.tasks import get as get_task
from pretrain.trainer.recompute import apply_recompute


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Vocabulary rounded up: matmuls on padded sizes run faster, and spare ids cost nothing."""
    return -(-n // multiple) * multiple


def model_config(spec: PretrainJobSpec, tokenizer: Any) -> Any:
    """A transformers config for the job; vocabulary defaults to the tokenizer's (padded)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    m = spec.model
    dims = resolve_dims(m)
    vocab = m.vocab_size or padded_vocab(len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(f"model.vocabSize {vocab} is below the tokenizer's {len(tokenizer)} tokens")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if m.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=dims.max_positions, n_embd=dims.hidden, n_layer=dims.layers,
            n_head=dims.heads, n_inner=dims.intermediate, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
            attn_pdrop=m.dropout, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, use_cache=False,
            # GPT-2's tanh GELU as torch's one fused op: the default "gelu_new" computes the same
            # function in seven elementwise ops, 1.17x the step time at 4x4x128 on CPU (profiled).
            activation_function="gelu_pytorch_tanh",
        )  # fmt: skip
    if m.family == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
            num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
            max_position_embeddings=dims.max_positions, attention_dropout=m.dropout,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False, use_cache=False,
        )  # fmt: skip
    return BertConfig(
        vocab_size=vocab, hidden_size=dims.hidden, num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
        intermediate_size=dims.intermediate, max_position_embeddings=dims.max_positions,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout, pad_token_id=pad,
    )  # fmt: skip


def auto_class(objective: str) -> Any:
    """The transformers Auto class of `objective`'s task (its head)."""
    import transformers

    from pretrain.tasks import get

    return getattr(transformers, get(objective).model_class)


def build_model(
    spec: PretrainJobSpec, tokenizer: Any, init_dir: Path | None = None, label_names: list[str] | None = None
) -> Any:
    """A fresh model from the spec, or the weights in `init_dir` (a local copy of initFrom);
    a fine-tuning task adds its head (and, for classification, the label mapping) on top."""
    objective = spec.objective_type
    cls = auto_class(objective)
    attn = spec.model.attention
    labels: dict[str, Any] = {}
    if label_names:
        labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                  "label2id": {n: i for i, n in enumerate(label_names)}}  # fmt: skip
    if init_dir is not None:
        model = cls.from_pretrained(str(init_dir), attn_implementation=attn, **labels)
    else:
        config = model_config(spec, tokenizer)
        for key, value in labels.items():
            setattr(config, key, value)
        model = cls.from_config(config, attn_implementation=attn)
    loss_type = get_task(objective).loss_type
    if loss_type:
        model.loss_type = loss_type
    apply_recompute(model, spec.training)
    return model


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases, norms and other vectors."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
