"""How each model family's parameters are laid out on a ``(data, fsdp, tensor)`` mesh.

Partition rules are ``(path regex, PartitionSpec)`` pairs for
:func:`spra.sharding.shard_params` and :func:`spra.sharding.param_shardings`:
the first regex that ``re.search``-es a leaf's path gives its spec, and leaves
no rule matches (biases of row-parallel layers, heads' biases, buffers) stay
replicated. The paths are this package's, which mirror the Hugging Face module
names. :func:`rules_for` picks a family's rules by its Hugging Face
``model_type`` (what :func:`spra.models.model_type` returns).

Example:

  >>> import jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> from spra_jax.models import partition
  >>> params = {'model': {'layers': [{'self_attn': {'o_proj': {'kernel': jnp.zeros((8, 8))}}}]}}
  >>> specs = spra.sharding.partition_specs(params, partition.rules_for('llama'))
  >>> specs['model']['layers'][0]['self_attn']['o_proj']['kernel']
  P('tensor', 'fsdp')
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

__all__ = ["BERT_RULES", "DEFAULT_RULES", "FAMILIES", "LLAMA_RULES", "rules_for"]

# Megatron-style tensor parallelism: column-parallel input projections (output
# features on `tensor`), row-parallel output projections (input features on
# `tensor`), so that each attention or MLP block needs one all-reduce of
# activations; `fsdp` splits the other dimension of every matrix. Norms are
# replicated. Kernels are stored [in, out].
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"(input_layernorm|post_attention_layernorm|norm)/scale$", P()),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    (r"(^|/)score/kernel$", P("fsdp", None)),
)

BERT_RULES: tuple[tuple[str, P], ...] = (
    (r"embeddings/(word|position|token_type)_embeddings/embedding$", P("tensor", "fsdp")),
    (r"attention/self/(query|key|value)/kernel$", P("fsdp", "tensor")),
    (r"attention/self/(query|key|value)/bias$", P("tensor")),
    (r"attention/output/dense/kernel$", P("tensor", "fsdp")),
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate/dense/bias$", P("tensor")),
    (r"layer/\d+/output/dense/kernel$", P("tensor", "fsdp")),
    (r"LayerNorm/(scale|bias)$", P()),
    (r"pooler/dense/kernel$", P("fsdp", "tensor")),
    (r"pooler/dense/bias$", P("tensor")),
    (r"(^|/)classifier/kernel$", P("fsdp", None)),
)

# Both families' rules: their paths do not overlap, so one list lays out either.
DEFAULT_RULES: tuple[tuple[str, P], ...] = LLAMA_RULES + BERT_RULES

# HF model_type -> its rules. The decoders are built by the Llama module, with the same paths; their extra norms
# (Gemma's pre/post-feedforward norms, the QK-norms) match the norm rule's ``norm/scale$`` and are replicated.
FAMILIES: dict[str, tuple[tuple[str, P], ...]] = {
    "bert": BERT_RULES,
    **{t: LLAMA_RULES for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")},
}


def rules_for(model_type: str) -> tuple[tuple[str, P], ...]:
  """The partition rules of a model family, by its Hugging Face ``model_type``.

  Args:
    model_type: ``'bert'`` or a decoder's (``'llama'``, ``'mistral'``,
      ``'qwen2'``, ``'qwen3'``, ``'phi3'``, ``'gemma'``, ``'gemma2'``,
      ``'gemma3_text'``), e.g. ``spra.models.model_type(model)``.

  Raises:
    ValueError: for a model type without rules; the message names the known ones.

  Example:

    >>> rules_for('qwen2') is rules_for('llama')
    True
    >>> rules_for('gpt2')
    Traceback (most recent call last):
    ...
    ValueError: no partition rules for model_type='gpt2'; rules cover 'bert', 'llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'gemma', 'gemma2', 'gemma3_text'.
  """
  if model_type not in FAMILIES:
    known = ", ".join(repr(t) for t in FAMILIES)
    raise ValueError(f"no partition rules for model_type={model_type!r}; rules cover {known}.")
  return FAMILIES[model_type]
