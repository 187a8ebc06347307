"""A LoRA baseline on the same models, for side-by-side studies with SpaRTA.

:func:`apply_lora` swaps chosen ``nnx.Linear`` layers, in place, for
:class:`LoRALinear` (an ``nnx.LoRALinear`` with the usual ``alpha / rank``
scale). The base ``kernel`` and ``bias`` variables are kept as they are (the
same objects, at the same paths), and each layer gains ``lora/lora_a``
[in, rank] and ``lora/lora_b`` [rank, out] as ``nnx.LoRAParam``. ``lora_b``
starts at zero, so the model's outputs are unchanged until training moves it.

Train only the adapters with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``
and ``nnx.DiffState(0, nnx.LoRAParam)`` in ``nnx.grad``.

Example:

  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from spra_jax.models import bert, lora
  >>> config = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
  ...                          intermediate_size=32, max_position_embeddings=8)
  >>> model = bert.build(config, task='base', rngs=nnx.Rngs(0))
  >>> lora.apply_lora(model, rank=4, include=r'attention/self/(query|value)$', rngs=nnx.Rngs(1))
  ['encoder/layer/0/attention/self/query', 'encoder/layer/0/attention/self/value',
   'encoder/layer/1/attention/self/query', 'encoder/layer/1/attention/self/value']
  >>> lora.lora_param_count(model)  # 4 layers x rank 4 x (16 + 16)
  512
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
"""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

__all__ = ["LoRALinear", "apply_lora", "lora_param_count"]


class LoRALinear(nnx.LoRALinear):
  """``nnx.LoRALinear`` whose low-rank branch is scaled: ``y = x W + b + scale · x A B``.

  Args:
    in_features: input width.
    out_features: output width.
    lora_rank: the rank of A [in, rank] and B [rank, out].
    scale: the multiplier of the LoRA branch (``alpha / rank`` by convention).
    **kwargs: passed to ``nnx.LoRALinear`` (``rngs``, ``dtype``, ...).

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = LoRALinear(3, 2, lora_rank=1, scale=2.0, rngs=nnx.Rngs(0))
    >>> layer.lora.lora_b.shape, layer.scale
    ((1, 2), 2.0)
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int, scale: float = 1.0, **kwargs: Any):
    super().__init__(in_features, out_features, lora_rank=lora_rank, **kwargs)
    self.scale = float(scale)

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
    return y + self.scale * self.lora(x)


def _path(parts: tuple) -> str:
  return "/".join(str(p) for p in parts)


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    include: str | re.Pattern,
    alpha: float | None = None,
    lora_param_dtype: Any = None,
    rngs: nnx.Rngs,
) -> list[str]:
  """Replaces the ``nnx.Linear`` layers whose path matches ``include`` by LoRA layers, in place.

  Args:
    model: an NNX model (e.g. from ``spra.models.from_pretrained``).
    rank: the LoRA rank r (> 0).
    include: regex searched in each Linear module's '/'-joined path, e.g.
      ``r'attention/self/(query|value)$'`` (BERT) or
      ``r'self_attn/(q_proj|v_proj)$'`` (Llama).
    alpha: LoRA alpha; the branch is scaled by ``alpha / rank`` (default
      ``alpha = rank``, scale 1).
    lora_param_dtype: dtype of A and B (default: the layer's ``param_dtype``).
    rngs: keys for A's initialisation (B starts at zero).

  Returns:
    The paths of the replaced layers, in model order.

  Raises:
    ValueError: a rank below 1, or ``include`` matching no Linear layer (the
      message lists some Linear paths).

  Example:

    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.v_proj = nnx.Linear(8, 8, rngs=rngs)
    ...     self.up_proj = nnx.Linear(8, 32, rngs=rngs)
    >>> block = Block(nnx.Rngs(0))
    >>> apply_lora(block, rank=2, include='v_proj', alpha=4.0, rngs=nnx.Rngs(1))
    ['v_proj']
    >>> type(block.v_proj).__name__, block.v_proj.scale, lora_param_count(block)
    ('LoRALinear', 2.0, 32)
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}.")
  pattern = re.compile(include) if isinstance(include, str) else include
  linears = [(parts, m) for parts, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Linear) and not isinstance(m, nnx.LoRALinear) and parts]
  chosen = [(parts, m) for parts, m in linears if pattern.search(_path(parts))]
  if not chosen:
    shown = ", ".join(repr(_path(p)) for p, _ in linears[:8])
    raise ValueError(f"include={pattern.pattern!r} matches no nnx.Linear layer; Linear paths look like {shown}.")
  scale = (float(alpha) if alpha is not None else float(rank)) / rank

  replaced = []
  for parts, linear in chosen:
    if len(linear.in_features if isinstance(linear.in_features, tuple) else (linear.in_features,)) != 1:
      raise ValueError(f"{_path(parts)!r} is not a plain 2-D Linear layer.")
    new = LoRALinear(
        linear.in_features, linear.out_features, lora_rank=rank, scale=scale, use_bias=linear.use_bias,
        dtype=linear.dtype, param_dtype=linear.param_dtype, precision=linear.precision,
        lora_dtype=linear.dtype,
        lora_param_dtype=linear.param_dtype if lora_param_dtype is None else lora_param_dtype, rngs=rngs,
    )
    # Keep the pretrained variables themselves (same objects, same paths), not copies.
    new.kernel = linear.kernel
    new.bias = linear.bias
    parent = model
    for p in parts[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(parts[-1], int):
      parent[parts[-1]] = new
    else:
      setattr(parent, parts[-1], new)
    replaced.append(_path(parts))
  return replaced


def lora_param_count(model: nnx.Module) -> int:
  """Number of trainable LoRA scalars (``nnx.LoRAParam`` entries) in ``model``.

  Example:

    >>> from flax import nnx
    >>> lora_param_count(nnx.LoRALinear(6, 4, lora_rank=2, rngs=nnx.Rngs(0)))  # 2 x (6 + 4)
    20
  """
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
