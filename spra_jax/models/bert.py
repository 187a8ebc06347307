"""BERT-family encoders (BERT, MiniLM) in Flax NNX, loadable from HF checkpoints.

The module tree mirrors Hugging Face's ``BertModel`` names, so parameter paths
read like the torch state dict: ``encoder/layer/3/attention/self/value/kernel``
is ``encoder.layer.3.attention.self.value.weight`` (transposed). The sequence
classifier nests the encoder under ``bert/`` next to ``classifier/``, as
``BertForSequenceClassification`` does.

The layers are post-LayerNorm, with exact (erf) GELU, learned absolute
positions, token types and an additive padding mask. Dropout is active exactly
when the call is given ``rngs``; without them the model is deterministic.

Example (a tiny random encoder):

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from spra_jax.models import bert
  >>> config = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
  ...                          intermediate_size=32, max_position_embeddings=16)
  >>> model = bert.build(config, task='base', rngs=nnx.Rngs(0))
  >>> ids = jnp.array([[2, 7, 9, 3], [2, 5, 3, 0]], jnp.int32)
  >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
  >>> hidden = model(ids, mask)
  >>> hidden.shape
  (2, 4, 16)
  >>> bert.mean_pool(hidden, mask, normalize=True).shape
  (2, 16)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spra_jax import sparse_backward
from spra_jax.models._io import load_params, to_torch_layout, torch_name

__all__ = [
    "MODEL_TYPES",
    "TASKS",
    "BertConfig",
    "BertModel",
    "BertForSequenceClassification",
    "config_from_hf",
    "build",
    "load_weights",
    "torch_name",
    "to_torch_layout",
    "mean_pool",
    "cls_pool",
    "l2_normalize",
]

MODEL_TYPES: tuple[str, ...] = ("bert",)
TASKS: tuple[str, ...] = ("base", "sequence-classification")

# Activations by their HF ``hidden_act`` name. BERT's "gelu" is the exact (erf) form.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Checkpoint tensors that are not parameters (buffers); never reported as unused or missing.
_BUFFERS = ("embeddings.position_ids",)
# Parameters a checkpoint may lack: freshly initialised heads (and the pooler, which
# sentence-embedding checkpoints sometimes drop). Regex-free prefixes of our paths.
_HEAD_PREFIXES = ("classifier/", "pooler/", "bert/pooler/")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT-family encoder (the fields of HF's ``BertConfig``).

  Example:

    >>> BertConfig(hidden_size=384, num_attention_heads=12).head_dim
    32
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  classifier_dropout: float | None = None
  num_labels: int = 2

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})."
      )
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def config_from_hf(hf_config: Any) -> BertConfig:
  """Reads a :class:`BertConfig` from a transformers config or a ``config.json`` dict.

  Args:
    hf_config: a ``transformers.PretrainedConfig`` or the plain dict of a
      ``config.json``.

  Returns:
    The config; ``num_labels`` comes from ``id2label`` when present.

  Raises:
    ValueError: for another model type or relative position embeddings.

  Example:

    >>> config_from_hf({'model_type': 'bert', 'hidden_size': 384, 'num_attention_heads': 12,
    ...                 'id2label': {'0': 'neg', '1': 'pos', '2': 'neutral'}}).num_labels
    3
  """
  raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  model_type = raw.get("model_type", "bert")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"spra_jax.models.bert handles model types {MODEL_TYPES}, got {model_type!r}.")
  position_type = raw.get("position_embedding_type") or "absolute"
  if position_type != "absolute":
    raise ValueError(f"only absolute position embeddings are supported, the config has {position_type!r}.")
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
  if "classifier_dropout" in raw:
    kwargs["classifier_dropout"] = raw["classifier_dropout"]
  if raw.get("id2label"):
    kwargs["num_labels"] = len(raw["id2label"])
  return BertConfig(**kwargs)


# --------------------------------------------------------------------------
# Modules. Attribute names follow HF's module names (hence ``LayerNorm``, ``self``).
# --------------------------------------------------------------------------


def _linear(config: BertConfig, din: int, dout: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return sparse_backward.Linear(din, dout, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _layer_norm(config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)


def _dropout(x: jax.Array, dropout: nnx.Dropout, rngs: nnx.Rngs | None) -> jax.Array:
  return dropout(x, deterministic=rngs is None, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + absolute position + token type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    def embed(n: int) -> nnx.Embed:
      return nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_position_embeddings)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob)
    self.dtype = dtype

  def _lookup(self, table: nnx.Embed, ids: jax.Array) -> jax.Array:
    # Gather the rows first, then cast: casting the whole table per call would cost vocab x hidden.
    return jnp.take(table.embedding[...], ids, axis=0).astype(self.dtype)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    x = (self._lookup(self.word_embeddings, input_ids) + self._lookup(self.token_type_embeddings, token_type_ids)
         + self._lookup(self.position_embeddings, position_ids))
    return _dropout(self.LayerNorm(x), self.dropout, rngs)


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = _linear(config, config.hidden_size, config.hidden_size, **kw)
    self.key = _linear(config, config.hidden_size, config.hidden_size, **kw)
    self.value = _linear(config, config.hidden_size, config.hidden_size, **kw)
    self.dropout = nnx.Dropout(config.attention_probs_dropout_prob)
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim

  def __call__(self, x: jax.Array, mask_bias: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
    batch, seq, hidden = x.shape
    split = lambda t: t.reshape(batch, seq, self.num_heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    if mask_bias is not None:
      scores = scores + mask_bias
    # Softmax in float32 whatever the compute dtype: bf16 exponentials lose the small probabilities.
    probs = _dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), self.dropout, rngs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, hidden)


class BertSelfOutput(nnx.Module):
  """Attention output projection, dropout, residual, LayerNorm (post-LN)."""

  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dense = _linear(config, config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
    self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob)

  def __call__(self, h: jax.Array, residual: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return self.LayerNorm(_dropout(self.dense(h), self.dropout, rngs) + residual)


class BertAttention(nnx.Module):
  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.self = BertSelfAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.output = BertSelfOutput(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask_bias: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
    return self.output(self.self(x, mask_bias, rngs), x, rngs)


class BertIntermediate(nnx.Module):
  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dense = _linear(config, config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
    self.activation = _ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.activation(self.dense(x))


class BertOutput(nnx.Module):
  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dense = _linear(config, config.intermediate_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
    self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob)

  def __call__(self, h: jax.Array, residual: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    return self.LayerNorm(_dropout(self.dense(h), self.dropout, rngs) + residual)


class BertLayer(nnx.Module):
  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = BertAttention(config, **kw)
    self.intermediate = BertIntermediate(config, **kw)
    self.output = BertOutput(config, **kw)

  def __call__(self, x: jax.Array, mask_bias: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
    x = self.attention(x, mask_bias, rngs)
    return self.output(self.intermediate(x), x, rngs)


class BertEncoder(nnx.Module):
  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.layer = nnx.List([BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                           for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask_bias: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
    for layer in self.layer:
      x = layer(x, mask_bias, rngs)
    return x


class BertPooler(nnx.Module):
  """``tanh(dense(h[:, 0]))``: the [CLS] summary the classification head reads."""

  def __init__(self, config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dense = _linear(config, config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(hidden_states[:, 0]))


def _check_ids(input_ids: jax.Array, attention_mask: jax.Array | None, token_type_ids: jax.Array | None) -> None:
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers of shape [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}.")
  for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
    if value is not None and tuple(value.shape) != tuple(input_ids.shape):
      raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(value.shape)}.")


class BertModel(nnx.Module):
  """The BERT encoder: embeddings, post-LN transformer layers and the pooler.

  Call it with int ``input_ids`` [batch, seq] and optional ``attention_mask``
  (1 for tokens, 0 for padding) and ``token_type_ids``; it returns the last
  hidden states [batch, seq, hidden] in ``dtype``. :meth:`pooled_output` gives
  the pooler's ``tanh(dense(h[:, 0]))``.

  Args:
    config: the :class:`BertConfig`.
    dtype: compute dtype (e.g. ``jnp.bfloat16``).
    param_dtype: parameter dtype.
    rngs: initialisation keys.
  """

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = BertEmbeddings(config, **kw)
    self.encoder = BertEncoder(config, **kw)
    self.pooler = BertPooler(config, **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, position_ids: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    _check_ids(input_ids, attention_mask, token_type_ids)
    batch, seq = input_ids.shape
    if seq > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {seq} exceeds max_position_embeddings={self.config.max_position_embeddings}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(seq, dtype=input_ids.dtype), (batch, seq))
    mask_bias = None
    if attention_mask is not None:
      # Additive mask over keys: 0 where attended, the most negative float32 where padded.
      keep = jnp.asarray(attention_mask).astype(jnp.float32)[:, None, None, :]
      mask_bias = (1.0 - keep) * jnp.finfo(jnp.float32).min
    x = self.embeddings(input_ids, jnp.asarray(token_type_ids), position_ids, rngs)
    return self.encoder(x, mask_bias, rngs)

  def pooled_output(self, hidden_states: jax.Array) -> jax.Array:
    """The pooler's ``tanh(dense(hidden_states[:, 0]))`` [batch, hidden]."""
    return self.pooler(hidden_states)


class BertForSequenceClassification(nnx.Module):
  """A BERT encoder with HF's classification head: pooler, dropout, ``classifier``.

  Called like :class:`BertModel`, it returns logits [batch, num_labels].
  """

  def __init__(self, config: BertConfig, *, num_labels: int, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.bert = BertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    self.dropout = nnx.Dropout(rate)
    self.classifier = _linear(config, config.hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_labels = num_labels

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, position_ids: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids=position_ids, rngs=rngs)
    return self.classifier(_dropout(self.bert.pooled_output(hidden), self.dropout, rngs))


def build(config: BertConfig, *, task: str, num_labels: int | None = None, dtype: Any = jnp.float32,
          param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """Builds a randomly initialised BERT model for ``task``.

  Args:
    config: the :class:`BertConfig`.
    task: ``"base"`` (hidden states) or ``"sequence-classification"`` (logits).
    num_labels: classes of the classification head (default ``config.num_labels``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs: initialisation keys.

  Returns:
    A :class:`BertModel` or :class:`BertForSequenceClassification`.

  Raises:
    ValueError: for an unknown task, or ``num_labels`` with ``task="base"``.

  Example:

    >>> from flax import nnx
    >>> config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=16, max_position_embeddings=8)
    >>> model = build(config, task='sequence-classification', num_labels=3, rngs=nnx.Rngs(0))
    >>> model.classifier.kernel.shape
    (8, 3)
  """
  if task not in TASKS:
    raise ValueError(f"BERT supports tasks {TASKS}, got task={task!r}.")
  if task == "base":
    if num_labels is not None:
      raise ValueError(f"num_labels={num_labels} needs task='sequence-classification', got task='base'.")
    return BertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  num_labels = config.num_labels if num_labels is None else int(num_labels)
  if num_labels < 1:
    raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
  return BertForSequenceClassification(config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# --------------------------------------------------------------------------
# Names, layouts and loading (torch_name and to_torch_layout come from _io).
# --------------------------------------------------------------------------


def _candidates(name: str) -> list[str]:
  """Names a tensor may have: with or without the ``bert.`` prefix, LayerNorm as weight/bias or gamma/beta."""
  names = [name, name[len("bert."):] if name.startswith("bert.") else "bert." + name]
  legacy = []
  for n in names:
    if ".LayerNorm." in n:
      legacy.append(n.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta"))
  return names + legacy


def _flat_params(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  return [("/".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def load_weights(model: nnx.Module, tensors: Mapping[str, Any], *, strict: bool = True) -> list[str]:
  """Copies checkpoint tensors into ``model`` in place, one tensor at a time.

  Works on a concrete model and on an abstract one from ``nnx.eval_shape``
  (its parameters become concrete as they load). Each tensor is read, laid out
  ([out, in] -> [in, out] for kernels), cast to the parameter's dtype and set,
  largest first, so host memory holds at most one tensor beyond the model.
  Names are matched with or without a ``bert.`` prefix (sentence-embedding
  checkpoints such as MiniLM have none; ``BertForSequenceClassification`` has
  it), and legacy ``LayerNorm.gamma``/``beta`` names are accepted. Buffers
  (``position_ids``) and tensors the model does not use (pre-training heads)
  are ignored.

  Args:
    model: a :class:`BertModel` or :class:`BertForSequenceClassification`.
    tensors: a mapping from HF torch names to lazy tensors (see
      :mod:`spra_jax.models._io`) or arrays.
    strict: raise when a parameter other than the pooler or classifier is
      missing from ``tensors``.

  Returns:
    Our paths of the parameters left at their initial values (e.g.
    ``['classifier/bias', 'classifier/kernel']``). On an abstract model these
    are still abstract.

  Raises:
    ValueError: a tensor whose shape does not fit (naming the tensor, its shape
      and the expected one), or missing tensors when ``strict``.

  Example:

    >>> import numpy as np
    >>> from flax import nnx
    >>> config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=16, max_position_embeddings=8)
    >>> source = build(config, task='base', rngs=nnx.Rngs(1))
    >>> state = {torch_name(p): to_torch_layout(p, v) for p, v in _flat_params(source)}
    >>> model = build(config, task='sequence-classification', num_labels=2, rngs=nnx.Rngs(0))
    >>> load_weights(model, state)
    ['classifier/bias', 'classifier/kernel']
    >>> bool(np.array_equal(model.bert.pooler.dense.kernel[...], source.pooler.dense.kernel[...]))
    True
  """
  return load_params(_flat_params(model), tensors, torch_name=torch_name, candidates=_candidates,
                     optional=_HEAD_PREFIXES, strict=strict, is_buffer=lambda name: name in _BUFFERS)


# --------------------------------------------------------------------------
# Pooling.
# --------------------------------------------------------------------------


def l2_normalize(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
  """Scales each row to unit L2 norm (rows with a norm below ``eps`` are divided by ``eps``).

  Example:

    >>> import jax.numpy as jnp
    >>> l2_normalize(jnp.array([[3.0, 4.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
  """
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def mean_pool(hidden_states: jax.Array, attention_mask: jax.Array | None = None, *,
              normalize: bool = False) -> jax.Array:
  """Mean of the hidden states over non-padding tokens (sentence embeddings), in float32.

  Args:
    hidden_states: [batch, seq, hidden].
    attention_mask: [batch, seq] of 1 (token) / 0 (padding); all tokens if None.
    normalize: L2-normalise each embedding (as sentence-transformers'
      ``normalize_embeddings=True``).

  Returns:
    [batch, hidden] float32.

  Example:

    >>> import jax.numpy as jnp
    >>> h = jnp.array([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
    [[2.0, 1.0]]
  """
  h = jnp.asarray(hidden_states, jnp.float32)
  if attention_mask is None:
    pooled = h.mean(axis=1)
  else:
    m = jnp.asarray(attention_mask, jnp.float32)[..., None]
    pooled = (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
  return l2_normalize(pooled) if normalize else pooled


def cls_pool(hidden_states: jax.Array, *, normalize: bool = False) -> jax.Array:
  """The first ([CLS]) token's hidden state, in float32.

  Example:

    >>> import jax.numpy as jnp
    >>> cls_pool(jnp.array([[[3.0, 4.0], [1.0, 1.0]]]), normalize=True).tolist()
    [[0.6000000238418579, 0.800000011920929]]
  """
  pooled = jnp.asarray(hidden_states, jnp.float32)[:, 0]
  return l2_normalize(pooled) if normalize else pooled
