"""Which leaves to sparsify, train fully or freeze, by name, for each architecture.

:func:`get` returns the ``include`` / ``exclude`` / ``full`` regexes of a
preset, ready for ``spra.sample_mask`` and ``spra.masked``. The presets select
whole projections: a chosen projection's kernel and bias are both eligible.

=============  ==========================================================
``paper``      attention V and O projections sparse (SpaRTA's choice)
``attention``  all attention projections (Q, K, V, O) sparse
``mlp``        the feed-forward projections sparse
``all-linear`` every linear layer of the body sparse (not an LM head)
=============  ==========================================================

In every preset the classification head (``classifier/`` for BERT, ``score/``
for the decoders) trains fully, and embeddings and norms stay frozen,
as does anything else the preset does not name (e.g. a causal LM's
``lm_head``). Pass ``task='causal-lm'`` or ``'base'`` for models without a
classification head, so that ``full`` is left out.

Example:

  >>> import jax
  >>> from flax import nnx
  >>> import spra_jax as spra
  >>> from spra_jax.models import bert, presets
  >>> config = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
  ...                          intermediate_size=32, max_position_embeddings=8)
  >>> model = bert.build(config, task='sequence-classification', num_labels=2, rngs=nnx.Rngs(0))
  >>> mask = spra.sample_mask(0, nnx.state(model, nnx.Param), density=0.05, **presets.get('paper', 'bert'))
  >>> print(spra.mask_summary(mask, show_frozen=False))
  path                                                shape     kind    trainable  density
  --------------------------------------------------  --------  ------  ---------  --------
  bert/encoder/layer/0/attention/output/dense/bias    (16,)     sparse          1  6.250%
  bert/encoder/layer/0/attention/output/dense/kernel  (16, 16)  sparse         13  5.078%
  bert/encoder/layer/0/attention/self/value/bias      (16,)     sparse          1  6.250%
  bert/encoder/layer/0/attention/self/value/kernel    (16, 16)  sparse         13  5.078%
  classifier/bias                                     (2,)      full            2  100.000%
  classifier/kernel                                   (16, 2)   full           32  100.000%
  total 3,362 entries, 62 trainable (1.844%)
"""

from __future__ import annotations

__all__ = ["PRESETS", "FAMILIES", "get", "available"]

PRESETS: tuple[str, ...] = ("paper", "all-linear", "mlp", "attention")

_BERT = {
    "paper": r"attention/(self/value|output/dense)/(kernel|bias)$",
    "attention": r"attention/(self/(query|key|value)|output/dense)/(kernel|bias)$",
    "mlp": r"layer/\d+/(intermediate|output)/dense/(kernel|bias)$",
    "all-linear": r"(attention/(self/(query|key|value)|output/dense)|layer/\d+/(intermediate|output)/dense"
                  r"|pooler/dense)/(kernel|bias)$",
    "exclude": r"(^|/)(embeddings|LayerNorm)/",
    "head": r"^classifier/",
}

_LLAMA = {
    "paper": r"self_attn/(v_proj|o_proj)/(kernel|bias)$",
    "attention": r"self_attn/(q_proj|k_proj|v_proj|o_proj)/(kernel|bias)$",
    "mlp": r"mlp/(gate_proj|up_proj|down_proj)/(kernel|bias)$",
    "all-linear": r"(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/(kernel|bias)$",
    "exclude": r"(^|/)(embed_tokens|norm|input_layernorm|post_attention_layernorm)/",
    "head": r"^score/",
}

# Gemma 2/3 norm the attention and MLP outputs too, and Qwen3 / Gemma 3 norm each query and key head.
_LLAMA_MORE_NORMS = {**_LLAMA, "exclude": r"(^|/)(embed_tokens|norm|input_layernorm|post_attention_layernorm"
                                          r"|pre_feedforward_layernorm|post_feedforward_layernorm|q_norm|k_norm)/"}

# HF model_type -> its pattern family. Phi-3's fused qkv_proj / gate_up_proj are split on load
# (spra_jax.models.llama.split_fused), so its presets name q/k/v and gate/up as Llama's do: ``paper`` is V and O.
FAMILIES: dict[str, dict[str, str]] = {
    "bert": _BERT, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "phi3": _LLAMA,
    "qwen3": _LLAMA_MORE_NORMS, "gemma": _LLAMA_MORE_NORMS, "gemma2": _LLAMA_MORE_NORMS,
    "gemma3_text": _LLAMA_MORE_NORMS,
}

_HEADLESS_TASKS = ("base", "causal-lm")


def available() -> dict[str, tuple[str, ...]]:
  """Preset names and the model types they cover.

  Example:

    >>> available()['presets']
    ('paper', 'all-linear', 'mlp', 'attention')
  """
  return {"presets": PRESETS, "model_types": tuple(FAMILIES)}


def get(name: str, model_type: str, *, task: str | None = None) -> dict[str, str | None]:
  """The ``include`` / ``exclude`` / ``full`` regexes of a preset.

  Args:
    name: one of :data:`PRESETS`.
    model_type: the HF model type (``'bert'``, ``'llama'``, ``'mistral'``,
      ``'qwen2'``, ``'qwen3'``, ``'phi3'``, ``'gemma'``, ``'gemma2'``,
      ``'gemma3_text'``).
    task: the model's task. ``None`` or ``'sequence-classification'`` adds
      the head as ``full``; ``'base'`` and ``'causal-lm'`` have no such head
      (``sample_mask`` rejects a pattern that matches no leaf), so ``full`` is
      None.

  Returns:
    ``dict(include=..., exclude=..., full=...)`` for ``spra.sample_mask`` or
    ``spra.masked``.

  Raises:
    ValueError: for an unknown preset, model type or task.

  Example:

    >>> get('paper', 'llama', task='causal-lm')
    {'include': 'self_attn/(v_proj|o_proj)/(kernel|bias)$',
     'exclude': '(^|/)(embed_tokens|norm|input_layernorm|post_attention_layernorm)/', 'full': None}
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; the presets are {PRESETS}.")
  if model_type not in FAMILIES:
    raise ValueError(f"no presets for model_type={model_type!r}; presets cover {tuple(FAMILIES)}.")
  if task not in (None, "sequence-classification", *_HEADLESS_TASKS):
    raise ValueError(f"task must be None, 'sequence-classification', 'base' or 'causal-lm', got {task!r}.")
  family = FAMILIES[model_type]
  return {
      "include": family[name],
      "exclude": family["exclude"],
      "full": None if task in _HEADLESS_TASKS else family["head"],
  }
