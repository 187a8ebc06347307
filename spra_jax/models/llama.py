"""Llama-family decoders (Llama, Mistral, Qwen2) in Flax NNX, loadable from HF checkpoints and GGUF files.

The module tree mirrors Hugging Face's ``LlamaForCausalLM`` names, so parameter
paths read like the torch state dict: ``model/layers/3/self_attn/v_proj/kernel``
is ``model.layers.3.self_attn.v_proj.weight`` (transposed, since our kernels are
[in, out]). A causal LM has ``lm_head/kernel`` unless its embeddings are tied
(then the logits use ``model/embed_tokens/embedding``); a sequence classifier
has ``score/kernel`` (no bias).

The layers are pre-RMSNorm, with rotate-half rotary embeddings (RoPE, optional
``linear`` or ``llama3`` scaling), grouped-query attention and a SwiGLU MLP.
Qwen2 adds biases to the Q/K/V projections. Attention scores and the softmax
are computed in float32 whatever the compute dtype.

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

from spra_jax.models._io import load_params, to_torch_layout, torch_name

__all__ = [
    "MODEL_TYPES",
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
    "rope_inv_freq",
    "build",
    "load_weights",
    "torch_name",
    "to_torch_layout",
]

MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "base")
# RoPE variants this module computes (HF's ``rope_type`` names).
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

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
  ``sliding_window`` is recorded but **ignored**: attention is always full
  causal, which equals sliding-window attention for sequences no longer than
  the window (4096 for Mistral 7B).

  Example:

    >>> LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3).head_dim
    64
    >>> LlamaConfig(rope_scaling={'rope_type': 'yarn', 'factor': 4.0})
    Traceback (most recent call last):
    ...
    ValueError: unsupported rope_scaling type 'yarn'; supported: None, 'default', 'linear', 'llama3'.
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
      needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
      absent = [k for k in needed if k not in scaling]
      if absent:
        raise ValueError(f"rope_scaling of type {kind!r} needs {list(needed)}, it lacks {absent}: {scaling}.")
      scaling["rope_type"] = kind
      scaling.pop("type", None)
      scaling.pop("rope_theta", None)
      # Stored as sorted (key, value) pairs: the config must stay hashable (it is static model data under jit).
      object.__setattr__(self, "rope_scaling", None if kind == "default" else tuple(sorted(scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def rope_type(self) -> str:
    return "default" if self.rope_scaling is None else self.rope_scaling_dict["rope_type"]

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    """``rope_scaling`` as a dict (empty for plain RoPE)."""
    return dict(self.rope_scaling or ())


def config_from_hf(hf_config: Any) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from a transformers config or a ``config.json`` dict.

  Both the transformers 5 ``rope_parameters`` dict and the older ``rope_theta``
  + ``rope_scaling`` keys are understood. Qwen2 configs get Q/K/V biases.

  Args:
    hf_config: a ``transformers.PretrainedConfig`` or the plain dict of a
      ``config.json`` with ``model_type`` in :data:`MODEL_TYPES`.

  Returns:
    The config; ``num_labels`` comes from ``id2label`` when present.

  Raises:
    ValueError: for another model type, partial rotary embeddings or an
      unsupported RoPE scaling type.

  Example:

    >>> c = config_from_hf({'model_type': 'llama', 'hidden_size': 64, 'num_attention_heads': 4,
    ...                     'rope_parameters': {'rope_type': 'default', 'rope_theta': 5e5}})
    >>> c.rope_theta, c.rope_scaling, c.head_dim
    (500000.0, None, 16)
    >>> config_from_hf({'model_type': 'qwen2', 'rope_theta': 1e6}).attention_bias
    True
  """
  raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  model_type = raw.get("model_type", "llama")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"spra_jax.models.llama handles model types {MODEL_TYPES}, got {model_type!r}.")
  rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
  theta = float(rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0)
  partial = rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor")) or 1.0
  if partial != 1.0:
    raise ValueError(f"partial rotary embeddings are not supported (partial_rotary_factor={partial}).")
  kind = rope.get("rope_type", rope.get("type", "default"))
  scaling = None if kind == "default" else rope
  if scaling is not None and kind == "llama3":
    scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 2048))

  fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"rope_theta", "rope_scaling", "attention_bias",
                                                                "sliding_window", "pad_token_id", "eos_token_id",
                                                                "bos_token_id"}
  kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
  kwargs.update(rope_theta=theta, rope_scaling=scaling, model_type=model_type,
                attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
                sliding_window=raw.get("sliding_window"), pad_token_id=raw.get("pad_token_id"),
                bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))
  if raw.get("id2label"):
    kwargs["num_labels"] = len(raw["id2label"])
  return LlamaConfig(**kwargs)


# --------------------------------------------------------------------------
# Rotary embeddings and the cache.
# --------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies [head_dim // 2] (float32), with the config's scaling applied.

  ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low
  frequencies (wavelengths above ``original_max_position_embeddings /
  low_freq_factor``) by ``factor``, keeps the high ones and interpolates
  smoothly between.

  Example:

    >>> c = LlamaConfig(hidden_size=16, num_attention_heads=2, rope_theta=100.0)
    >>> [round(float(f), 4) for f in rope_inv_freq(c)]
    [1.0, 0.3162, 0.1, 0.0316]
    >>> lin = LlamaConfig(hidden_size=16, num_attention_heads=2, rope_theta=100.0,
    ...                   rope_scaling={'rope_type': 'linear', 'factor': 2.0})
    >>> [round(float(f), 4) for f in rope_inv_freq(lin)]
    [0.5, 0.1581, 0.05, 0.0158]
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  kind = config.rope_type
  if kind == "linear":
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
  # x [b, s, heads, d]; cos/sin [b, s, d] broadcast over heads.
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
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
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x²) + eps) * scale``, normalised in float32 (as HF's ``LlamaRMSNorm``).

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> norm = RMSNorm(2, eps=0.0, rngs=nnx.Rngs(0))
    >>> [round(float(v), 4) for v in norm(jnp.array([[3.0, 4.0]]))[0]]
    [0.8485, 1.1314]
  """

  def __init__(self, dim: int, *, eps: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    del rngs  # ones, no randomness
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = float(eps)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * h.astype(self.dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.q_proj = _linear(config, config.hidden_size, h * d, use_bias=config.attention_bias, **kw)
    self.k_proj = _linear(config, config.hidden_size, kv * d, use_bias=config.attention_bias, **kw)
    self.v_proj = _linear(config, config.hidden_size, kv * d, use_bias=config.attention_bias, **kw)
    self.o_proj = _linear(config, h * d, config.hidden_size, use_bias=config.o_proj_bias, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``allowed`` [b, s, t] says which keys each query sees; with ``kv`` the new keys go to slots ``index..``."""
    b, s, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
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
    scores = scores.astype(jnp.float32) * (1.0 / math.sqrt(self.head_dim))
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
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = LlamaAttention(config, **kw)
    self.mlp = LlamaMLP(config, **kw)
    self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)

  def __call__(self, x, cos, sin, allowed, kv=None, index=None):
    h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), new_kv


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
    self.layers = nnx.List([LlamaDecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(config))  # static: a compile-time constant, no state
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
    freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    # Query i (slot start+i) sees key slot j when j <= start+i and slot j holds a token.
    causal = jnp.arange(t)[None, :] <= (start + jnp.arange(s))[:, None]
    allowed = causal[None] & (key_mask[:, None, :] > 0)

    x = jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0).astype(self.dtype)
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, new_kv = layer(x, cos, sin, allowed, kv, start)
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
    """The LM head on hidden states [..., hidden] -> float32 logits [..., vocab]."""
    if self.config.tie_word_embeddings:
      table = self.model.embed_tokens.embedding[...].astype(hidden.dtype)
      out = jnp.einsum("...d,vd->...v", hidden, table)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

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

  return load_params(_flat_params(model), tensors, torch_name=torch_name, candidates=_candidates,
                     optional=_HEAD_PREFIXES, strict=strict, is_buffer=lambda name: name.endswith(_BUFFER_SUFFIXES),
                     hint=hint)
