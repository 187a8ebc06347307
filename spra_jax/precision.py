"""Mixed precision: low-precision weights, float32 values for the entries that train.

A bfloat16 weight has 8 significant bits: at 1.0 its spacing is 2^-7 = 7.8e-3,
so an update smaller than half of that (3.9e-3) is rounded away when it is
added to the weight, and training at realistic learning rates silently stops.
SpaRTA trains k entries per weight, so keeping float32 values for those
entries costs O(k) bytes, where full fine-tuning would need a float32 copy of
every weight. Both training doors use that:

* :func:`spra.masked` keeps float32 *masters* of the trained entries of every
  leaf narrower than float32 (:func:`float32_masters`), runs the inner
  optimizer on them, and emits updates that land each trained entry on its
  master rounded once.
* :func:`spra.lean_step` keeps the *base* values at the mask's entries
  (:func:`base_entries`) beside the float32 delta, and writes
  ``round(base + delta)`` into the weights instead of adding each step's
  update to them.

Frozen entries are never written: they stay bit-identical to the base in every
dtype. :func:`float32_state` gives a dense optimizer (full fine-tuning, LoRA)
float32 moments over low-precision parameters.

Example (a bf16 weight and updates of 1e-3, below half its spacing at 1.0):

  >>> import jax.numpy as jnp
  >>> w = jnp.ones(4, jnp.bfloat16)
  >>> float((w + jnp.bfloat16(1e-3))[0])     # the update is rounded away
  1.0
  >>> is_low_precision(w.dtype), is_low_precision(jnp.float32), is_low_precision(jnp.int8)
  (True, False, False)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from spra_jax import compact
from spra_jax.masks import FROZEN, LeafMask

__all__ = ["FLOAT_DTYPES", "is_low_precision", "float_dtype", "base_entries", "float32_masters", "float32_state"]

# The dtype names the job and the models accept for parameters and compute.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def is_low_precision(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating type narrower than float32 (bfloat16, float16, the float8 types).

  >>> is_low_precision('bfloat16'), is_low_precision('float32'), is_low_precision('int8')
  (True, False, False)
  """
  dtype = jnp.dtype(dtype)
  return bool(jnp.issubdtype(dtype, jnp.floating)) and dtype.itemsize < 4


def float_dtype(name: Any, *, what: str = "dtype") -> jnp.dtype:
  """The floating dtype named ``name`` (one of :data:`FLOAT_DTYPES`, or such a dtype), with a clear error otherwise.

  >>> float_dtype('bfloat16')
  dtype(bfloat16)
  >>> float_dtype('int8', what='--param-dtype')
  Traceback (most recent call last):
  ...
  ValueError: --param-dtype must be one of ['float32', 'bfloat16', 'float16'], got 'int8'
  """
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in FLOAT_DTYPES:
    raise ValueError(f"{what} must be one of {list(FLOAT_DTYPES)}, got {str(name)!r}")
  return dtype


def _low_precision_leaf(m: LeafMask, x: Any) -> bool:
  # Leaves may be Python scalars or lists (optax takes them): their dtype is what JAX makes of them.
  return m.kind != FROZEN and x is not None and is_low_precision(getattr(x, "dtype", None) or jnp.result_type(x))


def base_entries(params: Any, mask: Any) -> Any:
  """The values of ``params`` at the mask's entries, for leaves narrower than float32 only (None if there are none).

  A compact tree (``[k]`` per sparse leaf, the whole array per full leaf) in
  the parameters' own dtype, with ``None`` for frozen and float32 leaves: what
  :func:`spra.lean_step` keeps so that it can write ``round(base + delta)``.

  >>> import jax.numpy as jnp
  >>> from spra_jax.masks import LeafMask
  >>> mask = {'w': LeafMask.sparse((4,), jnp.array([1, 3], jnp.int32)), 'b': LeafMask.full((2,))}
  >>> base_entries({'w': jnp.arange(4, dtype=jnp.bfloat16), 'b': jnp.zeros(2)}, mask)
  {'b': None, 'w': Array([1, 3], dtype=bfloat16)}
  >>> base_entries({'w': jnp.arange(4.), 'b': jnp.zeros(2)}, mask) is None
  True
  """
  entries = compact.map_leaves(
      lambda m, x: compact.gather(x, m) if _low_precision_leaf(m, x) else None, mask, params)
  return entries if jax.tree.leaves(entries) else None


def float32_masters(params: Any, mask: Any) -> Any:
  """:func:`base_entries` in float32: the master values :func:`spra.masked` starts from (None if there are none).

  >>> import jax.numpy as jnp
  >>> from spra_jax.masks import LeafMask
  >>> float32_masters({'w': jnp.arange(4, dtype=jnp.bfloat16)},
  ...                 {'w': LeafMask.sparse((4,), jnp.array([2], jnp.int32))})
  {'w': Array([2.], dtype=float32)}
  """
  entries = base_entries(params, mask)
  return None if entries is None else jax.tree.map(lambda x: x.astype(jnp.float32), entries)


def _to_float32(tree: Any) -> Any:
  def one(x):
    if x is None or not hasattr(x, "dtype") or not is_low_precision(x.dtype):
      return x
    return x.astype(jnp.float32)
  return jax.tree.map(one, tree)


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` run in float32 over parameters of any dtype: float32 moments, float32 updates.

  Parameters and gradients narrower than float32 are cast up before ``inner``
  sees them, so its state (AdamW's moments) is float32 whatever the weights'
  dtype, and the updates come back in float32; ``optax.apply_updates`` adds
  them in float32 and rounds once to each parameter's dtype. The weights
  themselves stay in their dtype: an update below half a bf16 spacing is still
  lost when it is applied (that is what SpaRTA's O(k) masters avoid).

  >>> import jax.numpy as jnp, optax
  >>> tx = float32_state(optax.adam(1e-3))
  >>> state = tx.init({'w': jnp.ones(3, jnp.bfloat16)})
  >>> state[0].mu['w'].dtype, state[0].nu['w'].dtype
  (dtype('float32'), dtype('float32'))
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_to_float32(params))

  def update_fn(updates, state, params=None, **extra_args):
    return inner.update(_to_float32(updates), state, _to_float32(params), **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
