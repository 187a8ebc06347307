"""Decoder-only LMs (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) in Flax NNX, loadable from HF checkpoints and GGUF.

The module tree mirrors Hugging Face's ``LlamaForCausalLM`` names, so parameter
paths read like the torch state dict: ``model/layers/3/self_attn/v_proj/kernel``
is ``model.layers.3.self_attn.v_proj.weight`` (transposed, since our kernels are
[in, out]). A causal LM has ``lm_head/kernel`` unless its embeddings are tied
(then the logits use ``model/embed_tokens/embedding``); a sequence classifier
has ``score/kernel`` (no bias).

The layers are pre-RMSNorm, with rotate-half rotary embeddings (RoPE, optional
``linear`` or ``llama3`` scaling), grouped-query attention and a gated MLP.
Attention scores and the softmax are computed in float32 whatever the compute
dtype. The families differ by config switches of :class:`LlamaConfig`, which
:func:`config_from_hf` sets from a Hugging Face config:

===============  =============================================================
``llama``        the base layout (SwiGLU MLP, untied or tied head)
``mistral``      sliding-window attention on every layer when ``sliding_window`` is set
``qwen2``        Q/K/V biases; sliding window on layers ``>= max_window_layers``
                 when ``use_sliding_window``
``qwen3``        QK-norm (RMSNorm over each head of Q and K), no biases
``phi3``         fused ``qkv_proj`` / ``gate_up_proj`` in the checkpoint, split on
                 load into ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``
``gemma``        embeddings scaled by sqrt(hidden), RMSNorm ``x * (1 + w)``, GeGLU
                 (tanh-approximated GELU), tied head, free ``head_dim``
``gemma2``       Gemma plus norms after attention and MLP, attention-logit and
                 final-logit soft-capping, alternating sliding/global layers,
                 query scale ``query_pre_attn_scalar ** -0.5``
``gemma3_text``  Gemma 2 without attention soft-capping, plus QK-norm and a second RoPE
                 base for the sliding layers (``rope_local_base_freq``)
===============  =============================================================

Sliding-window attention follows transformers: on a sliding layer, the query
in cache slot i sees the key slots j with ``i - window < j <= i``. The KV cache
keeps every slot (a window shorter than the sequence only masks). Config fields
that change the output and that this module does not compute (other RoPE types,
partial rotary embeddings, bidirectional attention, ...) raise a ``ValueError``
naming the field.

Calling convention: ``model(input_ids, attention_mask=None, *, positions=None,
cache=None)``. Without ``cache`` the call returns an array (hidden states,
logits [batch, seq, vocab] or classification logits [batch, num_labels]).
With a :class:`KVCache` (from :meth:`LlamaModel.init_cache`) it returns
``(output, new_cache)``; :func:`spra_jax.models.generate.generate` builds on
that. ``positions`` defaults to ``0 .. seq-1`` (as in HF's forward), or, with a
cache, to the cache's next slots.

Example (a tiny random causal LM):

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from spra_jax.models import llama
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
  ...                            num_attention_heads=4, num_key_value_heads=2)
  >>> model = llama.build(config, task='causal-lm', rngs=nnx.Rngs(0))
  >>> ids = jnp.array([[1, 7, 9, 3], [1, 5, 3, 0]], jnp.int32)
  >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
  >>> model(ids, attention_mask=mask).shape
  (2, 4, 64)
  >>> llama.torch_name('model/layers/0/self_attn/q_proj/kernel')
  'model.layers.0.self_attn.q_proj.weight'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spra_jax import sparse_backward
from spra_jax.models._io import load_params, to_torch_layout, torch_name

__all__ = [
    "MODEL_TYPES",
    "LAYER_TYPES",
    "TASKS",
    "ROPE_TYPES",
    "LlamaConfig",
    "KVCache",
    "RMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "config_from_hf",
    "fused_layout",
    "rope_attention_scaling",
    "rope_inv_freq",
    "split_fused",
    "fuse_split",
    "build",
    "load_weights",
    "torch_name",
    "to_torch_layout",
]

MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# The attention kinds of ``LlamaConfig.layer_types`` (HF's names).
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "base")
# RoPE variants this module computes (HF's ``rope_type`` names).
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "longrope")

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
# Checkpoint tensors that are not parameters (buffers of older exports).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
# Parameters a checkpoint may lack: a freshly initialised classification head.
_HEAD_PREFIXES = ("score/",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family decoder (the fields of HF's ``LlamaConfig``).

  ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
  ``num_key_value_heads`` to ``num_attention_heads``. ``rope_scaling`` is None
  or a dict with ``rope_type`` in :data:`ROPE_TYPES` and that type's fields
  (``factor``; for ``llama3`` also ``low_freq_factor``, ``high_freq_factor``,
  ``original_max_position_embeddings``). ``attention_bias`` puts biases on the
  Q/K/V projections (and on O for Llama/Mistral configs that set
  ``attention_bias``; Qwen2 has Q/K/V biases only, see ``o_proj_bias``).
  ``sliding_window`` (tokens) applies to the layers whose ``layer_types``
  entry is ``'sliding_attention'``; ``layer_types=None`` means every layer
  when a window is set. The Gemma switches: ``scale_embeddings`` (multiply the
  embeddings by sqrt(hidden_size)), ``norm_offset`` (RMSNorm multiplies by
  ``norm_offset + w``: 1.0 for Gemma), ``sandwich_norms`` (Gemma 2/3's norms
  after attention and around the MLP), ``qk_norm`` (RMSNorm on each query and
  key head, Qwen3 and Gemma 3), ``query_pre_attn_scalar`` (scores scaled by
  its inverse square root instead of ``head_dim``'s), ``attn_logit_softcapping``
  and ``final_logit_softcapping`` (``cap * tanh(x / cap)`` on the attention
  scores and on the LM logits) and ``local_rope_theta`` (the RoPE base of the
  sliding layers, without scaling; None: the global RoPE everywhere).

  Example:

    >>> LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3).head_dim
    64
    >>> LlamaConfig(rope_scaling={'rope_type': 'yarn', 'factor': 4.0})
    Traceback (most recent call last):
    ...
    ValueError: unsupported rope_scaling type 'yarn'; supported: None, 'default', 'linear', 'llama3', 'longrope'.
    >>> LlamaConfig(num_hidden_layers=3, sliding_window=8,
    ...             layer_types=['sliding_attention', 'full_attention', 'sliding_attention']).sliding_layers
    (True, False, True)
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  o_proj_bias: bool | None = None
  mlp_bias: bool = False
  sliding_window: int | None = None
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  num_labels: int = 2
  model_type: str = "llama"
  layer_types: tuple[str, ...] | list[str] | None = None
  scale_embeddings: bool = False
  norm_offset: float = 0.0
  sandwich_norms: bool = False
  qk_norm: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  local_rope_theta: float | None = None
  partial_rotary_factor: float = 1.0

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                         f"({self.num_attention_heads}) when head_dim is not given.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.o_proj_bias is None:
      # Llama/Mistral's attention_bias covers all four projections; Qwen2's Q/K/V biases leave O without one.
      object.__setattr__(self, "o_proj_bias", self.attention_bias and self.model_type != "qwen2")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads}).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim == 0:
      raise ValueError(f"partial_rotary_factor must give an even number of rotary dimensions in (0, head_dim]; "
                       f"got {self.partial_rotary_factor} of head_dim {self.head_dim} ({self.rotary_dim}).")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}.")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: None, "
                         f"{', '.join(repr(t) for t in ROPE_TYPES)}.")
      needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}.get(kind, ())
      absent = [k for k in needed if k not in scaling]
      if absent:
        raise ValueError(f"rope_scaling of type {kind!r} needs {list(needed)}, it lacks {absent}: {scaling}.")
      if kind == "longrope":
        half = int(self.head_dim * self.partial_rotary_factor) // 2
        for name in ("short_factor", "long_factor"):
          if len(scaling[name]) != half:
            raise ValueError(f"rope_scaling {name} must have rotary_dim / 2 = {half} entries, got "
                             f"{len(scaling[name])}.")
          scaling[name] = tuple(float(f) for f in scaling[name])  # (hashable)
      scaling["rope_type"] = kind
      scaling.pop("type", None)
      scaling.pop("rope_theta", None)
      # Stored as sorted (key, value) pairs: the config must stay hashable (it is static model data under jit).
      object.__setattr__(self, "rope_scaling", None if kind == "default" else tuple(sorted(scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    self._check_layer_types()
    for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive or None, got {value!r}.")

  def _check_layer_types(self) -> None:
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}.")
    if self.layer_types is None:
      return
    kinds = tuple(self.layer_types)
    if len(kinds) != self.num_hidden_layers or any(k not in LAYER_TYPES for k in kinds):
      raise ValueError(f"layer_types must list one of {LAYER_TYPES} for each of the {self.num_hidden_layers} "
                       f"layers, got {list(kinds)}.")
    object.__setattr__(self, "layer_types", kinds)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends within ``sliding_window`` only."""
    if self.sliding_window is None:
      return (False,) * self.num_hidden_layers
    if self.layer_types is None:
      return (True,) * self.num_hidden_layers
    return tuple(k == "sliding_attention" for k in self.layer_types)

  @property
  def rotary_dim(self) -> int:
    """How many leading dimensions of each head the rotary embedding turns (``head_dim`` unless partial)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def rope_type(self) -> str:
    return "default" if self.rope_scaling is None else self.rope_scaling_dict["rope_type"]

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    """``rope_scaling`` as a dict (empty for plain RoPE)."""
    return dict(self.rope_scaling or ())


# Defaults of the HF config classes for keys a ``config.json`` may omit (when they differ from LlamaConfig's).
_GEMMA_DEFAULTS = dict(tie_word_embeddings=True, head_dim=256, hidden_activation="gelu_pytorch_tanh")
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=128),
    "gemma": dict(_GEMMA_DEFAULTS, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_GEMMA_DEFAULTS, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA_DEFAULTS, query_pre_attn_scalar=256, sliding_window=4096),
}
# The families whose window covers every layer (their HF attention ignores ``layer_types``).
_WINDOW_ON_EVERY_LAYER = ("mistral", "phi3")


# The families whose attention turns only the leading partial_rotary_factor of each head (as transformers' does).
_PARTIAL_ROTARY = ("phi3",)


def _rope_of(rope: dict[str, Any], theta: Any, max_positions: int, model_type: str = "llama"
             ) -> tuple[float, dict[str, Any] | None, float]:
  """(theta, scaling dict or None, partial rotary factor) from one RoPE parameter dict.

  A partial rotary factor is refused for the families whose transformers attention does not apply one.
  """
  rope = dict(rope)
  theta = float(rope.pop("rope_theta", None) or theta or 10000.0)
  partial = float(rope.pop("partial_rotary_factor", None) or 1.0)
  if partial != 1.0 and model_type not in _PARTIAL_ROTARY:
    raise ValueError(f"partial rotary embeddings are not supported for {model_type} "
                     f"(partial_rotary_factor={partial}); they are for {', '.join(_PARTIAL_ROTARY)}.")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "su" and model_type == "phi3":  # the name Phi-3's first long-context checkpoints used
    kind = rope["rope_type"] = "longrope"
    rope.pop("type", None)
  if kind == "longrope" and model_type != "phi3":
    raise ValueError(f"rope type 'longrope' is supported for phi3 only, got it for {model_type}.")
  if kind == "default":
    return theta, None, partial
  if kind == "llama3":
    rope.setdefault("original_max_position_embeddings", max_positions)
  return theta, rope, partial


def _layer_types(raw: dict[str, Any], model_type: str, layers: int, window: int | None) -> list[str] | None:
  """Each layer's attention kind, as the family's HF attention decides it."""
  if window is None or model_type in _WINDOW_ON_EVERY_LAYER:
    return None
  if raw.get("layer_types"):
    return list(raw["layer_types"])
  if model_type in ("qwen2", "qwen3"):
    first = raw.get("max_window_layers", 28)
    return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
  if model_type in ("gemma2", "gemma3_text"):
    every = 2 if model_type == "gemma2" else int(raw.get("sliding_window_pattern") or 6)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
  return None  # llama, gemma: HF's attention has no window, whatever the config says


def _refuse_unsupported(raw: dict[str, Any], model_type: str) -> None:
  """Raises for config fields that change the output and that this module does not compute."""
  if raw.get("use_bidirectional_attention"):
    raise ValueError(f"use_bidirectional_attention={raw['use_bidirectional_attention']!r} is not supported "
                     "(these models attend causally).")
  if model_type == "gemma3_text" and raw.get("attn_logit_softcapping") is not None:
    # transformers' Gemma 3 attention does not apply it, so neither outcome would be what the config seems to ask.
    raise ValueError(f"attn_logit_softcapping={raw['attn_logit_softcapping']!r} is not supported for gemma3_text "
                     "(transformers' Gemma 3 ignores it); set it to null.")
  if raw.get("layer_types") and any(k not in LAYER_TYPES for k in raw["layer_types"]):
    raise ValueError(f"layer_types may hold {LAYER_TYPES} only, got {sorted(set(raw['layer_types']))}.")


def config_from_hf(hf_config: Any) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from a transformers config or a ``config.json`` dict.

  Both the transformers 5 ``rope_parameters`` dict (per layer type for Gemma 3)
  and the older ``rope_theta`` + ``rope_scaling`` (+ ``rope_local_base_freq``)
  keys are understood. Each family gets its switches (see the module's table),
  and keys a ``config.json`` omits take the HF config class's defaults.

  Args:
    hf_config: a ``transformers.PretrainedConfig`` or the plain dict of a
      ``config.json`` with ``model_type`` in :data:`MODEL_TYPES`.

  Returns:
    The config; ``num_labels`` comes from ``id2label`` when present.

  Raises:
    ValueError: for another model type, or a field that changes the output
      and is not supported (partial rotary embeddings outside Phi-3, an unsupported RoPE
      scaling type, bidirectional attention); the message names the field.

  Example:

    >>> c = config_from_hf({'model_type': 'llama', 'hidden_size': 64, 'num_attention_heads': 4,
    ...                     'rope_parameters': {'rope_type': 'default', 'rope_theta': 5e5}})
    >>> c.rope_theta, c.rope_scaling, c.head_dim
    (500000.0, None, 16)
    >>> config_from_hf({'model_type': 'qwen2', 'rope_theta': 1e6}).attention_bias
    True
    >>> g = config_from_hf({'model_type': 'gemma2', 'num_hidden_layers': 4})
    >>> g.sliding_layers, g.norm_offset, g.tie_word_embeddings, g.hidden_act
    ((True, False, True, False), 1.0, True, 'gelu_pytorch_tanh')
    >>> config_from_hf({'model_type': 'qwen2', 'sliding_window': 64, 'use_sliding_window': False}).sliding_window
    >>> config_from_hf({'model_type': 'phi3', 'hidden_size': 64, 'num_attention_heads': 4,
    ...                 'partial_rotary_factor': 0.75}).rotary_dim
    12
    >>> config_from_hf({'model_type': 'llama', 'partial_rotary_factor': 0.75})
    Traceback (most recent call last):
    ...
    ValueError: partial rotary embeddings are not supported for llama (partial_rotary_factor=0.75); they are for phi3.
  """
  raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  model_type = raw.get("model_type", "llama")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"spra_jax.models.llama handles model types {MODEL_TYPES}, got {model_type!r}.")
  raw = {**_FAMILY_DEFAULTS.get(model_type, {}), **raw}
  _refuse_unsupported(raw, model_type)
  max_positions = raw.get("max_position_embeddings", 2048)
  rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
  local_theta = None
  if model_type == "gemma3_text":
    full = rope.get("full_attention", rope if "sliding_attention" not in rope else {})
    local = rope.get("sliding_attention") or {"rope_theta": raw.get("rope_local_base_freq") or 10000.0}
    local_theta, local_scaling, _ = _rope_of(local, 10000.0, max_positions, model_type)
    if local_scaling is not None:
      raise ValueError(f"rope_parameters['sliding_attention'] must be plain RoPE, got {local_scaling}.")
    theta, scaling, partial = _rope_of(full, raw.get("rope_theta") or 1e6, max_positions, model_type)
  else:
    if "partial_rotary_factor" in raw:
      rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su") and raw.get("original_max_position_embeddings"):
      rope.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
    theta, scaling, partial = _rope_of(rope, raw.get("rope_theta"), max_positions, model_type)

  gemma = model_type.startswith("gemma")
  window = raw.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
    window = None
  if model_type in ("llama", "gemma"):
    window = None  # their HF attention has no window
  activation = raw.get("hidden_activation") if model_type in ("gemma2", "gemma3_text") else raw.get("hidden_act")
  if model_type == "gemma" and activation == "gelu":
    activation = "gelu_pytorch_tanh"  # what transformers reads a legacy Gemma "gelu" as

  fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {
      "rope_theta", "rope_scaling", "attention_bias", "sliding_window", "layer_types", "hidden_act",
      "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "model_type",
      "partial_rotary_factor"}
  kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
  kwargs.update(
      rope_theta=theta, rope_scaling=scaling, model_type=model_type, sliding_window=window,
      partial_rotary_factor=partial,
      attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
      layer_types=_layer_types(raw, model_type, raw.get("num_hidden_layers", 32), window),
      scale_embeddings=gemma, norm_offset=1.0 if gemma else 0.0, sandwich_norms=model_type in ("gemma2", "gemma3_text"),
      qk_norm=model_type in ("qwen3", "gemma3_text"), local_rope_theta=local_theta,
      query_pre_attn_scalar=raw.get("query_pre_attn_scalar") if gemma and model_type != "gemma" else None,
      attn_logit_softcapping=raw.get("attn_logit_softcapping") if model_type == "gemma2" else None,
      final_logit_softcapping=raw.get("final_logit_softcapping") if gemma else None)
  if activation is not None:
    kwargs["hidden_act"] = activation
  for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
    kwargs[key] = raw.get(key)
  if raw.get("id2label"):
    kwargs["num_labels"] = len(raw["id2label"])
  return LlamaConfig(**kwargs)


# --------------------------------------------------------------------------
# Rotary embeddings and the cache.
# --------------------------------------------------------------------------


def rope_attention_scaling(config: LlamaConfig) -> float:
  """The factor a ``longrope`` embedding multiplies cos and sin by (1.0 for every other kind).

  ``attention_factor`` when the config gives one, else ``sqrt(1 + ln f / ln L0)`` with ``f`` the context
  extension (``factor``, or ``max_position_embeddings / original_max_position_embeddings``) and ``L0`` the
  original context, as transformers computes it.

  Example:

    >>> c = LlamaConfig(hidden_size=16, num_attention_heads=2, model_type='phi3', max_position_embeddings=131072,
    ...                 rope_scaling={'rope_type': 'longrope', 'short_factor': [1.0] * 4, 'long_factor': [4.0] * 4,
    ...                               'original_max_position_embeddings': 4096})
    >>> round(rope_attention_scaling(c), 4), rope_attention_scaling(LlamaConfig())
    (1.1902, 1.0)
  """
  if config.rope_type != "longrope":
    return 1.0
  s = config.rope_scaling_dict
  if s.get("attention_factor") is not None:
    return float(s["attention_factor"])
  original = float(s["original_max_position_embeddings"])
  factor = float(s.get("factor") or config.max_position_embeddings / original)
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_inv_freq(config: LlamaConfig, *, local: bool = False, long: bool = False) -> np.ndarray:
  """The rotary inverse frequencies [rotary_dim // 2] (float32), with the config's scaling applied.

  ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low
  frequencies (wavelengths above ``original_max_position_embeddings /
  low_freq_factor``) by ``factor``, keeps the high ones and interpolates
  smoothly between; ``longrope`` divides each frequency by its ``short_factor``
  (``long=True``: its ``long_factor``, used once a call's positions pass
  ``original_max_position_embeddings``). ``local=True`` gives the sliding layers'
  frequencies: plain RoPE with base ``config.local_rope_theta`` when it is set.

  Example:

    >>> c = LlamaConfig(hidden_size=16, num_attention_heads=2, rope_theta=100.0)
    >>> [round(float(f), 4) for f in rope_inv_freq(c)]
    [1.0, 0.3162, 0.1, 0.0316]
    >>> lin = LlamaConfig(hidden_size=16, num_attention_heads=2, rope_theta=100.0,
    ...                   rope_scaling={'rope_type': 'linear', 'factor': 2.0})
    >>> [round(float(f), 4) for f in rope_inv_freq(lin)]
    [0.5, 0.1581, 0.05, 0.0158]
    >>> two = dataclasses.replace(lin, local_rope_theta=10000.0)
    >>> [round(float(f), 4) for f in rope_inv_freq(two, local=True)]
    [1.0, 0.1, 0.01, 0.001]
  """
  dim = config.rotary_dim
  local = local and config.local_rope_theta is not None
  theta = config.local_rope_theta if local else config.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  kind = "default" if local else config.rope_type
  if kind == "longrope":  # per-frequency factors: the short ones up to the original context, the long ones past it
    ext = np.asarray(config.rope_scaling_dict["long_factor" if long else "short_factor"], np.float32)
    inv_freq = (1.0 / (ext * theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  elif kind == "linear":
    inv_freq = inv_freq / np.float32(config.rope_scaling_dict["factor"])
  elif kind == "llama3":
    s = config.rope_scaling_dict
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s.get("original_max_position_embeddings") or config.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  # x [b, s, heads, d]; cos/sin [b, s, r] broadcast over heads, r <= d: a partial rotary embedding turns the first
  # r dimensions of each head and passes the rest through.
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  r = cos.shape[-1]
  if r < x.shape[-1]:
    turned, passed = x[..., :r], x[..., r:]
    return jnp.concatenate([turned * cos + _rotate_half(turned) * sin, passed], axis=-1)
  return x * cos + _rotate_half(x) * sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Preallocated keys and values of every layer, for incremental decoding.

  Attributes:
    keys: per layer, [batch, max_length, num_key_value_heads, head_dim].
    values: per layer, like ``keys``.
    mask: [batch, max_length] int32, 1 where a slot holds a real (non-padding) token.
    index: int32 scalar, the next slot to write.

  Slots are written in order, so slot order is time order: a query at slot i
  attends to the filled slots j <= i whose ``mask`` is 1. Make one with
  :meth:`LlamaModel.init_cache` (or ``model.init_cache`` on any head).

  Example:

    >>> c = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
    ...                 num_attention_heads=2, num_key_value_heads=1)
    >>> cache = KVCache.create(c, batch=3, max_length=10)
    >>> len(cache.keys), cache.keys[0].shape, int(cache.index)
    (2, (3, 10, 1, 4), 0)
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, config: LlamaConfig, *, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (prompt included)."""
    if batch < 1 or max_length < 1:
      raise ValueError(f"batch and max_length must be positive, got batch={batch}, max_length={max_length}.")
    shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
               mask=jnp.zeros((batch, max_length), jnp.int32), index=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return int(self.mask.shape[1])


# --------------------------------------------------------------------------
# Modules. Attribute names follow HF's module names.
# --------------------------------------------------------------------------


def _linear(config: LlamaConfig, din: int, dout: int, *, use_bias: bool, dtype: Any, param_dtype: Any,
            rngs: nnx.Rngs) -> nnx.Linear:
  return sparse_backward.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x²) + eps) * (offset + scale)``, normalised in float32.

  ``offset=0`` is HF's ``LlamaRMSNorm`` (the normalised value is cast to the
  compute dtype, then scaled); ``offset=1`` is Gemma's (scaled by ``1 + w`` in
  float32, then cast; the scale starts at zero).

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> norm = RMSNorm(2, eps=0.0, rngs=nnx.Rngs(0))
    >>> [round(float(v), 4) for v in norm(jnp.array([[3.0, 4.0]]))[0]]
    [0.8485, 1.1314]
    >>> gemma = RMSNorm(2, eps=0.0, offset=1.0, rngs=nnx.Rngs(0))
    >>> float(gemma.scale[0]), [round(float(v), 4) for v in gemma(jnp.array([[3.0, 4.0]]))[0]]
    (0.0, [0.8485, 1.1314])
  """

  def __init__(self, dim: int, *, eps: float, offset: float = 0.0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    del rngs  # constant init, no randomness
    self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))
    self.eps = float(eps)
    self.offset = float(offset)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (h * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * h.astype(self.dtype)


def _norm(config: LlamaConfig, dim: int, **kw: Any) -> RMSNorm:
  return RMSNorm(dim, eps=config.rms_norm_eps, offset=config.norm_offset, **kw)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.q_proj = _linear(config, config.hidden_size, h * d, use_bias=config.attention_bias, **kw)
    self.k_proj = _linear(config, config.hidden_size, kv * d, use_bias=config.attention_bias, **kw)
    self.v_proj = _linear(config, config.hidden_size, kv * d, use_bias=config.attention_bias, **kw)
    self.o_proj = _linear(config, h * d, config.hidden_size, use_bias=config.o_proj_bias, **kw)
    if config.qk_norm:
      self.q_norm = _norm(config, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.k_norm = _norm(config, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
    self.qk_norm = config.qk_norm
    self.scaling = (config.query_pre_attn_scalar or d) ** -0.5
    self.softcap = config.attn_logit_softcapping

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``allowed`` [b, s, t] says which keys each query sees; with ``kv`` the new keys go to slots ``index..``."""
    b, s, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      new_kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    # Query head n reads key/value head n // groups (HF's repeat_kv order).
    q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores.astype(jnp.float32) * self.scaling, self.softcap)
    # Masked with the most negative float (not -inf): a row with no allowed key stays finite (uniform).
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, self.num_heads * self.head_dim)
    return self.o_proj(out), new_kv


class LlamaMLP(nnx.Module):
  """SwiGLU: ``down(act(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = _linear(config, config.hidden_size, config.intermediate_size, **kw)
    self.up_proj = _linear(config, config.hidden_size, config.intermediate_size, **kw)
    self.down_proj = _linear(config, config.intermediate_size, config.hidden_size, **kw)
    self.act = _ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  With ``config.sandwich_norms`` (Gemma 2/3) the outputs are normalised too:
  ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
  ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``.
  ``sliding`` says whether the layer attends within the config's window.
  """

  def __init__(self, config: LlamaConfig, *, sliding: bool = False, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = LlamaAttention(config, **kw)
    self.mlp = LlamaMLP(config, **kw)
    self.input_layernorm = _norm(config, config.hidden_size, **kw)
    self.post_attention_layernorm = _norm(config, config.hidden_size, **kw)
    if config.sandwich_norms:
      self.pre_feedforward_layernorm = _norm(config, config.hidden_size, **kw)
      self.post_feedforward_layernorm = _norm(config, config.hidden_size, **kw)
    self.sandwich = config.sandwich_norms
    self.sliding = bool(sliding)

  def __call__(self, x, cos, sin, allowed, kv=None, index=None):
    h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, index)
    if not self.sandwich:
      x = x + h
      return x + self.mlp(self.post_attention_layernorm(x)), new_kv
    x = x + self.post_attention_layernorm(h)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), new_kv


def _rope_tables(positions: jax.Array, inv_freq: tuple[float, ...], long: Any = None
                 ) -> tuple[jax.Array, jax.Array]:
  """cos and sin [batch, seq, rotary_dim] of the rotary embedding at ``positions``, in float32.

  ``long``: a longrope embedding's ``(long inv_freq, original context, attention scaling)``; the long frequencies
  serve the whole call once its largest position reaches past the original context (transformers' rule).
  """
  positions = jnp.asarray(positions)
  inv = jnp.asarray(inv_freq, jnp.float32)
  scale = 1.0
  if long is not None:
    long_freq, original, scale = long
    inv = jnp.where(positions.max() + 1 > original, jnp.asarray(long_freq, jnp.float32), inv)
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def _check_ids(input_ids: jax.Array, attention_mask: Any, positions: Any) -> None:
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers of shape [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}.")
  for name, value in (("attention_mask", attention_mask), ("positions", positions)):
    if value is not None and tuple(jnp.shape(value)) != tuple(input_ids.shape):
      raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                       f"got {tuple(jnp.shape(value))}.")


class LlamaModel(nnx.Module):
  """The decoder body: token embeddings, pre-norm layers and the final RMSNorm.

  Call it with int ``input_ids`` [batch, seq], optional ``attention_mask``
  (1 for tokens, 0 for padding), ``positions`` (default ``0 .. seq-1``, or the
  cache's next slots) and ``cache`` (a :class:`KVCache`). It returns the final
  hidden states [batch, seq, hidden] in ``dtype`` (and the updated cache when
  one was given).

  Args:
    config: the :class:`LlamaConfig`.
    dtype: compute dtype (e.g. ``jnp.bfloat16``).
    param_dtype: parameter dtype.
    rngs: initialisation keys.
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(config, sliding=sliding, **kw) for sliding in config.sliding_layers])
    self.norm = _norm(config, config.hidden_size, **kw)
    # Static: compile-time constants, no state. The sliding layers may have their own RoPE base (Gemma 3).
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(config))
    self.local_inv_freq = tuple(float(f) for f in rope_inv_freq(config, local=True))
    self.long_rope = None
    if config.rope_type == "longrope":
      self.long_rope = (tuple(float(f) for f in rope_inv_freq(config, long=True)),
                        int(config.rope_scaling_dict["original_max_position_embeddings"]),
                        rope_attention_scaling(config))
    self.dtype = dtype

  def init_cache(self, *, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty :class:`KVCache` (in the compute dtype unless ``dtype`` says otherwise)."""
    return KVCache.create(self.config, batch=batch, max_length=max_length, dtype=dtype or self.dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None) -> Any:
    input_ids = jnp.asarray(input_ids)
    _check_ids(input_ids, attention_mask, positions)
    b, s = input_ids.shape
    tokens = jnp.ones((b, s), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    if cache is None:
      start = jnp.zeros((), jnp.int32)
      key_mask, t = tokens, s
    else:
      if cache.mask.shape[0] != b:
        raise ValueError(f"the cache holds batch {cache.mask.shape[0]}, input_ids have batch {b}.")
      start = cache.index
      key_mask = jax.lax.dynamic_update_slice(cache.mask, tokens, (0, start))
      t = cache.max_length
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    rope = {False: _rope_tables(positions, self.inv_freq, self.long_rope)}
    rope[True] = rope[False] if self.local_inv_freq == self.inv_freq else _rope_tables(positions, self.local_inv_freq)
    # Query i (slot start+i) sees key slot j when j <= start+i and slot j holds a token; on a sliding layer
    # also j > start+i - window (transformers' rule, on slots: padding slots count towards the window).
    query_slot, key_slot = (start + jnp.arange(s))[:, None], jnp.arange(t)[None, :]
    allowed = {False: (key_slot <= query_slot)[None] & (key_mask[:, None, :] > 0)}
    if self.config.sliding_window is not None:
      allowed[True] = allowed[False] & (key_slot > query_slot - self.config.sliding_window)[None]

    table = self.embed_tokens.embedding[...]
    x = jnp.take(table, input_ids, axis=0)
    if self.config.scale_embeddings:
      # In the table's dtype, as transformers does (sqrt(hidden) is rounded to bf16 for bf16 weights).
      x = x * jnp.asarray(math.sqrt(self.config.hidden_size), table.dtype)
    x = x.astype(self.dtype)
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      cos, sin = rope[layer.sliding]
      x, new_kv = layer(x, cos, sin, allowed[layer.sliding], kv, start)
      if new_kv is not None:
        new_keys.append(new_kv[0])
        new_values.append(new_kv[1])
    x = self.norm(x)
    if cache is None:
      return x
    return x, KVCache(keys=tuple(new_keys), values=tuple(new_values), mask=key_mask, index=start + s)


class LlamaForCausalLM(nnx.Module):
  """A :class:`LlamaModel` under ``model/`` with the LM head: logits [batch, seq, vocab] in float32.

  With ``config.tie_word_embeddings`` there is no ``lm_head``: the logits are
  ``hidden @ embed_tokens.T``.
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config, config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.config = config

  def init_cache(self, *, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty :class:`KVCache` for :meth:`__call__` with ``cache=``."""
    return self.model.init_cache(batch=batch, max_length=max_length, dtype=dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The LM head on hidden states [..., hidden] -> float32 logits [..., vocab] (soft-capped for Gemma 2)."""
    if self.config.tie_word_embeddings:
      table = self.model.embed_tokens.embedding[...].astype(hidden.dtype)
      out = jnp.einsum("...d,vd->...v", hidden, table)
    else:
      out = self.lm_head(hidden)
    return _softcap(out.astype(jnp.float32), self.config.final_logit_softcapping)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: KVCache | None = None) -> Any:
    out = self.model(input_ids, attention_mask, positions=positions, cache=cache)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache


class LlamaForSequenceClassification(nnx.Module):
  """A :class:`LlamaModel` under ``model/`` with ``score`` (no bias) on the last token: [batch, num_labels].

  The pooled token is, per row, the rightmost position whose ``attention_mask``
  is 1 (right or left padding both work). Without a mask it is the rightmost
  token other than ``config.pad_token_id`` (as HF does), or the last position
  when there is no pad token.
  """

  def __init__(self, config: LlamaConfig, *, num_labels: int, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.score = _linear(config, config.hidden_size, num_labels, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.num_labels = num_labels
    self.config = config

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, cache: None = None) -> jax.Array:
    if cache is not None:
      raise ValueError("LlamaForSequenceClassification takes no cache (it scores whole sequences).")
    input_ids = jnp.asarray(input_ids)
    hidden = self.model(input_ids, attention_mask, positions=positions)
    seq = input_ids.shape[1]
    if attention_mask is not None:
      real = jnp.asarray(attention_mask) > 0
    elif self.config.pad_token_id is not None:
      real = input_ids != self.config.pad_token_id
    else:
      real = jnp.ones(input_ids.shape, bool)
    last = jnp.argmax(jnp.where(real, jnp.arange(seq), -1), axis=-1)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return self.score(pooled).astype(jnp.float32)


def build(config: LlamaConfig, *, task: str, num_labels: int | None = None, dtype: Any = jnp.float32,
          param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """Builds a randomly initialised Llama-family model for ``task``.

  Args:
    config: the :class:`LlamaConfig`.
    task: ``"causal-lm"`` (logits over the vocabulary), ``"sequence-classification"``
      (``score`` on the last token) or ``"base"`` (hidden states).
    num_labels: classes of the classification head (default ``config.num_labels``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs: initialisation keys.

  Returns:
    A :class:`LlamaForCausalLM`, :class:`LlamaForSequenceClassification` or :class:`LlamaModel`.

  Raises:
    ValueError: for an unknown task, or ``num_labels`` without a classification task.

  Example:

    >>> from flax import nnx
    >>> config = LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                      num_attention_heads=2)
    >>> build(config, task='sequence-classification', num_labels=3, rngs=nnx.Rngs(0)).score.kernel.shape
    (8, 3)
  """
  if task not in TASKS:
    raise ValueError(f"Llama supports tasks {TASKS}, got task={task!r}.")
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if task != "sequence-classification":
    if num_labels is not None:
      raise ValueError(f"num_labels={num_labels} needs task='sequence-classification', got task={task!r}.")
    return LlamaModel(config, **kw) if task == "base" else LlamaForCausalLM(config, **kw)
  num_labels = config.num_labels if num_labels is None else int(num_labels)
  if num_labels < 1:
    raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
  return LlamaForSequenceClassification(config, num_labels=num_labels, **kw)


# --------------------------------------------------------------------------
# Names, layouts and loading (torch_name and to_torch_layout come from _io).
# --------------------------------------------------------------------------


def _candidates(name: str) -> list[str]:
  """Names a tensor may have: as is, or without the ``model.`` prefix (bare ``LlamaModel`` checkpoints)."""
  names = [name]
  if name.startswith("model."):
    names.append(name[len("model."):])
  else:
    names.append("model." + name)
  return names


class _Rows:
  """Rows ``start:stop`` of a checkpoint tensor, read lazily (one part of a fused projection)."""

  def __init__(self, tensor: Any, start: int, stop: int):
    self._tensor, self._start, self._stop = tensor, start, stop
    self.shape = (stop - start, *tuple(tensor.shape)[1:])
    self.dtype = np.dtype(getattr(tensor, "dtype", np.float32))

  def __call__(self) -> np.ndarray:
    whole = self._tensor() if callable(self._tensor) else np.asarray(self._tensor)
    return np.ascontiguousarray(whole[self._start:self._stop])


def fused_layout(config: LlamaConfig) -> dict[str, list[tuple[str, int]]]:
  """Phi-3's fused projections: fused suffix -> [(each part's own suffix, its rows)], in the fused order.

  Give it to ``spra.checkpoint.export_peft_sparta`` / ``import_peft_sparta`` / ``export_merged`` (``fused=``) so
  that their files name transformers' ``qkv_proj`` and ``gate_up_proj`` rather than the split projections.

  Example:

    >>> c = LlamaConfig(hidden_size=8, intermediate_size=6, num_attention_heads=2, num_key_value_heads=1,
    ...                 model_type='phi3')
    >>> fused_layout(c)['mlp.gate_up_proj.weight']
    [('mlp.gate_proj.weight', 6), ('mlp.up_proj.weight', 6)]
  """
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  return {"self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                        ("self_attn.v_proj.weight", kv)],
          "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", config.intermediate_size),
                                      ("mlp.up_proj.weight", config.intermediate_size)]}


def split_fused(tensors: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
  """A Phi-3 checkpoint's tensors with ``qkv_proj`` and ``gate_up_proj`` split into the separate projections.

  The parts stay lazy: each reads its rows of the fused tensor when called.
  Other tensors (and checkpoints without fused tensors) pass through. A fused
  tensor whose rows do not add up to the config's sizes is kept as it is, so
  that loading reports it by name.

  Example:

    >>> import numpy as np
    >>> c = LlamaConfig(hidden_size=4, intermediate_size=3, num_attention_heads=2, num_key_value_heads=1,
    ...                 model_type='phi3')
    >>> parts = split_fused({'model.layers.0.mlp.gate_up_proj.weight': np.arange(24.).reshape(6, 4)}, c)
    >>> sorted(parts), parts['model.layers.0.mlp.up_proj.weight']()[:, 0].tolist()
    (['model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.up_proj.weight'], [12.0, 16.0, 20.0])
  """
  out: dict[str, Any] = {}
  parts_of = fused_layout(config)
  for name, tensor in tensors.items():
    suffix = next((f for f in parts_of if name.endswith(f)), None)
    rows = None if suffix is None else [n for _, n in parts_of[suffix]]
    if rows is None or tuple(tensor.shape)[0] != sum(rows):
      out[name] = tensor
      continue
    start = 0
    for part, n in parts_of[suffix]:
      out[name[:-len(suffix)] + part] = _Rows(tensor, start, start + n)
      start += n
  return out


def fuse_split(tensors: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
  """The inverse of :func:`split_fused`: torch-named tensors with Phi-3's fused ``qkv_proj`` / ``gate_up_proj``.

  Use it on a merged model's state (our :func:`torch_name` names the split
  projections) before writing a checkpoint for transformers' ``Phi3`` classes.

  Example:

    >>> import numpy as np
    >>> c = LlamaConfig(hidden_size=4, intermediate_size=3, num_attention_heads=2, num_key_value_heads=1,
    ...                 model_type='phi3')
    >>> fused = {'model.layers.0.mlp.gate_up_proj.weight': np.arange(24.).reshape(6, 4)}
    >>> back = fuse_split(split_fused(fused, c), c)
    >>> list(back), bool((back['model.layers.0.mlp.gate_up_proj.weight'] == fused[list(fused)[0]]).all())
    (['model.layers.0.mlp.gate_up_proj.weight'], True)
  """
  out = {k: v for k, v in tensors.items()}
  for fused, parts in fused_layout(config).items():
    first = parts[0][0]
    for name in [n for n in tensors if n.endswith(first)]:
      prefix = name[:-len(first)]
      names = [prefix + part for part, _ in parts]
      if all(n in tensors for n in names):
        arrays = [np.asarray(out.pop(n)() if callable(tensors[n]) else out.pop(n)) for n in names]
        out[prefix + fused] = np.concatenate(arrays, axis=0)
  return out


def _model_config(model: nnx.Module) -> LlamaConfig | None:
  config = getattr(model, "config", None)
  return config if isinstance(config, LlamaConfig) else None


def _flat_params(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  return [("/".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def load_weights(model: nnx.Module, tensors: Mapping[str, Any], *, strict: bool = True) -> list[str]:
  """Copies checkpoint tensors into ``model`` in place, one tensor at a time.

  Works on a concrete model and on an abstract one from ``nnx.eval_shape``
  (its parameters become concrete as they load). Each tensor is read, laid out
  ([out, in] -> [in, out] for kernels), cast to the parameter's dtype and set,
  largest first, so host memory holds at most one tensor beyond the model.
  Names match with or without the ``model.`` prefix. A tied model ignores a
  checkpoint's ``lm_head.weight``; tensors the model does not use are ignored.
  Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are split on the way in
  (:func:`split_fused`), so the model has separate Q/K/V and gate/up kernels.

  Args:
    model: a model from :func:`build`.
    tensors: a mapping from HF torch names to lazy tensors (see
      :mod:`spra_jax.models._io`) or arrays.
    strict: raise when a parameter other than the ``score`` head is missing.

  Returns:
    Our paths of the parameters left at their initial values (e.g.
    ``['score/kernel']``); on an abstract model these stay abstract.

  Raises:
    ValueError: a tensor whose shape does not fit (naming the tensor, its shape
      and the expected one), or missing tensors when ``strict``.

  Example:

    >>> import numpy as np
    >>> from flax import nnx
    >>> config = LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                      num_attention_heads=2, tie_word_embeddings=True)
    >>> source = build(config, task='causal-lm', rngs=nnx.Rngs(1))
    >>> state = {torch_name(p): to_torch_layout(p, v) for p, v in _flat_params(source)}
    >>> model = build(config, task='sequence-classification', num_labels=2, rngs=nnx.Rngs(0))
    >>> load_weights(model, state)
    ['score/kernel']
    >>> state['model.norm.weight'] = np.zeros(9, np.float32)
    >>> load_weights(model, state)
    Traceback (most recent call last):
    ...
    ValueError: checkpoint tensor 'model.norm.weight' has shape (9,), but the model expects (8,) (for 'model/norm/scale'); is the config right for this checkpoint?
  """
  def hint(missing: list[str]) -> str:
    return " (a checkpoint without lm_head.weight usually has tie_word_embeddings=True)" \
        if "lm_head/kernel" in missing else ""

  config = _model_config(model)
  if config is not None and config.model_type == "phi3":
    tensors = split_fused(tensors, config)
  return load_params(_flat_params(model), tensors, torch_name=torch_name, candidates=_candidates,
                     optional=_HEAD_PREFIXES, strict=strict, is_buffer=lambda name: name.endswith(_BUFFER_SUFFIXES),
                     hint=hint)
