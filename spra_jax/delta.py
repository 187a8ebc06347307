"""Sparse deltas: the trained change of a SpaRTA run, as indices plus values.

A :class:`SparseDelta` pairs a mask (per leaf: frozen, full, or sorted int32
flat indices) with a compact tree of values (a ``[k]`` vector per sparse leaf,
the whole array per full leaf, ``None`` per frozen leaf). The fine-tuned model
is ``merge(base, delta)``: θ = θ_base + scatter(φ, Δφ).

Example:

  >>> import jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> base = {'w': jnp.zeros((4, 4))}
  >>> mask = spra.sample_mask(jax.random.key(0), base, density=0.25)
  >>> tuned = spra.merge(base, spra.init_delta(mask).replace(values={'w': jnp.ones(4)}))
  >>> delta = spra.extract(tuned, base, mask)
  >>> float(delta.values['w'].sum()), int((tuned['w'] != 0).sum())
  (4.0, 4)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spra_jax import compact, sparse_backward
from spra_jax.masks import FROZEN, FULL, SPARSE, LeafMask, is_leaf_mask, num_trainable, path_str, validate

__all__ = [
    "SparseDelta",
    "init_delta",
    "extract",
    "merge",
    "unmerge",
    "add_deltas",
    "attach",
    "grad",
    "value_and_grad",
    "apply_updates",
]


@jax.tree_util.register_pytree_node_class
class SparseDelta:
  """Indices and values per parameter leaf.

  Attributes:
    mask: a params-shaped tree of ``LeafMask`` (the indices).
    values: the compact tree of values: ``[k]`` per sparse leaf, the leaf's
      shape per full leaf, ``None`` per frozen leaf.

  A ``SparseDelta`` is a pytree whose leaves are the index vectors and the
  value arrays, so it can be passed through ``jax.jit``, ``device_put`` and
  checkpoints. Deltas add with ``+`` (over the union of their indices).
  """

  __slots__ = ("mask", "values")

  def __init__(self, mask: Any, values: Any):
    self.mask = mask
    self.values = values

  def tree_flatten(self):
    return (self.mask, self.values), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    obj = object.__new__(cls)
    obj.mask, obj.values = children
    return obj

  def replace(self, *, values: Any) -> SparseDelta:
    """The same indices with new values (of the same compact structure)."""
    return SparseDelta(self.mask, values)

  @property
  def num_trainable(self) -> int:
    """Number of scalar values the delta holds."""
    return num_trainable(self.mask)

  @property
  def nbytes(self) -> int:
    """Bytes of the values plus 4 per sparse index."""
    values = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.values))
    indices = sum(4 * m.num_trainable for m in jax.tree.leaves(self.mask, is_leaf=is_leaf_mask) if m.kind == SPARSE)
    return values + indices

  def __add__(self, other: SparseDelta) -> SparseDelta:
    return add_deltas(self, other)

  def __repr__(self) -> str:
    leaves = jax.tree.leaves(self.mask, is_leaf=is_leaf_mask)
    n_sparse = sum(m.kind == SPARSE for m in leaves)
    n_full = sum(m.kind == FULL for m in leaves)
    return f"SparseDelta(trainable={self.num_trainable:,}, sparse_leaves={n_sparse}, full_leaves={n_full})"


def init_delta(mask: Any, dtype: Any = jnp.float32) -> SparseDelta:
  """A zero delta over ``mask``: merging it leaves the base model unchanged.

  Args:
    mask: a mask from :func:`spra.sample_mask`.
    dtype: dtype of the values. float32 by default, also for bf16 models, so
      that small updates are not lost to rounding.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> d = init_delta({'w': LeafMask.sparse((3, 3), jnp.array([0, 4], jnp.int32))})
    >>> d.values['w']
    Array([0., 0.], dtype=float32)
  """

  def zeros(m: LeafMask):
    if m.kind == FROZEN:
      return None
    return jnp.zeros(m.shape if m.kind == FULL else (m.num_trainable,), dtype)

  return SparseDelta(mask, compact.map_leaves(zeros, mask))


def _accumulate_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def extract(tuned: Any, base: Any, mask: Any) -> SparseDelta:
  """The delta ``tuned - base`` at the mask's entries.

  Differences are taken in at least float32, so ``merge(base, extract(tuned,
  base, mask))`` gives back ``tuned`` on the mask: bit-exactly for bf16 and f16
  parameters, and within one float32 rounding (at the larger of the base and
  tuned magnitudes) for float32 parameters. Entries
  outside the mask are not looked at: if ``tuned`` differs from ``base`` there,
  that difference is not in the delta.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> mask = {'w': LeafMask.sparse((2, 2), jnp.array([3], jnp.int32))}
    >>> extract({'w': jnp.full((2, 2), 2.)}, {'w': jnp.ones((2, 2))}, mask).values['w']
    Array([1.], dtype=float32)
  """
  validate(mask, base)
  validate(mask, tuned, check_indices=False)

  def diff(m: LeafMask, t: Any, b: Any):
    if t is None:
      return None
    acc = _accumulate_dtype(t.dtype)
    return t.astype(acc) - b.astype(acc)

  return SparseDelta(mask, compact.map_leaves(diff, mask, compact.gather(tuned, mask), compact.gather(base, mask)))


def _add_leaf(m: LeafMask, x: Any, v: Any, sign: float = 1.0) -> Any:
  """Leaf ``x`` plus ``sign`` x its compact values ``v`` at the mask's entries (summed in float32, rounded once)."""
  if m.kind == FROZEN:
    return x
  return _add_entries(m, x, v, sign=sign)


# One compiled program per leaf shape (merging eagerly would otherwise compile each of its few operations apart).
@functools.partial(jax.jit, static_argnames="sign")
def _add_entries(m: LeafMask, x: Any, v: Any, *, sign: float) -> Any:
  acc = _accumulate_dtype(x.dtype)
  if m.kind == FULL:
    return (x.astype(acc) + sign * v.astype(acc)).astype(x.dtype)
  new = (compact.take(x, m).astype(acc) + sign * v.astype(acc)).astype(x.dtype)
  return compact.put(x, m, new)


def _apply(base: Any, delta: SparseDelta, sign: float) -> Any:
  validate(delta.mask, base, check_indices=False)
  return compact.map_leaves(lambda m, x, v: _add_leaf(m, x, v, sign), delta.mask, base, delta.values)


def merge(base: Any, delta: SparseDelta) -> Any:
  """The fine-tuned parameters ``base + delta``, in ``base``'s dtypes.

  The sum is computed in at least float32 and rounded once to the parameter
  dtype. Under ``jax.jit`` with ``base`` donated, XLA updates it in place.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> d = SparseDelta({'w': LeafMask.sparse((3,), jnp.array([1], jnp.int32))}, {'w': jnp.array([5.])})
    >>> merge({'w': jnp.ones(3)}, d)['w']
    Array([1., 6., 1.], dtype=float32)
  """
  return _apply(base, delta, 1.0)


def unmerge(merged: Any, delta: SparseDelta) -> Any:
  """Removes a merged delta: ``merged - delta`` (inverse of :func:`merge`).

  Exact when the merge did not round (float32 parameters with float32 deltas
  whose sums are representable); otherwise within one rounding of the base.
  Keep the base weights when bit-exactness matters.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> d = SparseDelta({'w': LeafMask.sparse((3,), jnp.array([1], jnp.int32))}, {'w': jnp.array([5.])})
    >>> unmerge(merge({'w': jnp.ones(3)}, d), d)['w']
    Array([1., 1., 1.], dtype=float32)
  """
  return _apply(merged, delta, -1.0)


def _union_leaf(path: str, masks: list[LeafMask], values: list[Any]) -> tuple[LeafMask, Any]:
  shapes = {m.shape for m in masks}
  if len(shapes) > 1:
    raise ValueError(f"cannot add deltas: leaf {path!r} has shapes {sorted(shapes)} in different deltas.")
  shape = masks[0].shape
  live = [(m, v) for m, v in zip(masks, values) if m.kind != FROZEN]
  if not live:
    return LeafMask.frozen(shape), None
  dtype = jnp.result_type(*[v.dtype for _, v in live])
  if any(m.kind == FULL for m, _ in live):
    total = jnp.zeros(shape, dtype)
    for m, v in live:
      total = total + v.astype(dtype) if m.kind == FULL else compact.scatter_add(total, v.astype(dtype), m)
    return LeafMask.full(shape), total
  # Union of sorted index sets, then sum the values that land on each index.
  all_idx = [np.asarray(m.indices) for m, _ in live]
  union = np.unique(np.concatenate(all_idx)).astype(np.int32)
  total = jnp.zeros(union.shape, dtype)
  for idx, (_, v) in zip(all_idx, live):
    total = total.at[np.searchsorted(union, idx)].add(v.astype(dtype))
  return LeafMask.sparse(shape, jnp.asarray(union)), total


def add_deltas(*deltas: SparseDelta) -> SparseDelta:
  """The sum of several deltas, over the union of their indices.

  ``merge(base, add_deltas(a, b))`` equals ``merge(merge(base, a), b)`` up to
  rounding. A leaf that is full in any delta is full in the sum. Runs eagerly
  (the union's size depends on the index values).

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> a = SparseDelta({'w': LeafMask.sparse((4,), jnp.array([0, 2], jnp.int32))}, {'w': jnp.array([1., 1.])})
    >>> b = SparseDelta({'w': LeafMask.sparse((4,), jnp.array([2, 3], jnp.int32))}, {'w': jnp.array([1., 1.])})
    >>> s = add_deltas(a, b)
    >>> s.mask['w'].indices.tolist(), s.values['w'].tolist()
    ([0, 2, 3], [1.0, 2.0, 1.0])
  """
  if not deltas:
    raise ValueError("add_deltas needs at least one delta.")
  for d in deltas:
    if not isinstance(d, SparseDelta):
      raise TypeError(f"add_deltas expects SparseDelta arguments, got {type(d).__name__}.")
  mask_def = jax.tree.structure(deltas[0].mask, is_leaf=is_leaf_mask)
  for i, d in enumerate(deltas[1:], start=1):
    other = jax.tree.structure(d.mask, is_leaf=is_leaf_mask)
    if other != mask_def:
      raise ValueError(f"cannot add deltas: delta {i} has tree structure {other}, delta 0 has {mask_def}.")
  flat_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(deltas[0].mask, is_leaf=is_leaf_mask)[0]]
  per_delta_masks = [mask_def.flatten_up_to(d.mask) for d in deltas]
  per_delta_values = [mask_def.flatten_up_to(d.values) for d in deltas]
  new_masks, new_values = [], []
  for j, path in enumerate(flat_paths):
    m, v = _union_leaf(path, [ms[j] for ms in per_delta_masks], [vs[j] for vs in per_delta_values])
    new_masks.append(m)
    new_values.append(v)
  return SparseDelta(mask_def.unflatten(new_masks), mask_def.unflatten(new_values))


# --------------------------------------------------------------------------
# The memory-lean training path: differentiate the delta values only.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _through_sparse(weight: jax.Array, values: jax.Array, indices: jax.Array, blocks: Any) -> jax.Array:
  del values, indices, blocks
  return weight


def _through_sparse_fwd(weight, values, indices, blocks):
  del blocks
  return weight, (values, indices)


def _through_sparse_bwd(blocks, residuals, cotangent):
  values, indices = residuals
  # The weight's dense cotangent exists only here, one layer at a time; keep k
  # of its entries and let XLA free the rest at once.
  picked = compact.take(cotangent, LeafMask.sparse(cotangent.shape, indices, blocks=blocks))
  return None, picked.astype(values.dtype), None


_through_sparse.defvjp(_through_sparse_fwd, _through_sparse_bwd)


@jax.custom_vjp
def _through_full(weight: jax.Array, values: jax.Array) -> jax.Array:
  del values
  return weight


def _through_full_fwd(weight, values):
  return weight, jnp.zeros((0,), values.dtype)


def _through_full_bwd(dtype_carrier, cotangent):
  return None, cotangent.astype(dtype_carrier.dtype)


_through_full.defvjp(_through_full_fwd, _through_full_bwd)


def attach(params: Any, delta: SparseDelta, *, backward: sparse_backward.Backward | str | None = None) -> Any:
  """The weights for the forward pass, with gradients flowing to ``delta``.

  ``params`` must already hold the fine-tuned weights (base + delta), as
  :func:`apply_updates` keeps them; ``attach`` returns the same values. Its
  custom VJP sends each weight's gradient to ``delta.values``: a sparse leaf
  receives the k entries of its weight gradient at the mask's indices, gathered
  right where the backward pass forms that gradient, and a full leaf receives
  the whole gradient. Frozen leaves get no weight gradient at all. The backward
  pass therefore never holds more than one layer's dense weight gradient, and
  the optimizer sees only k values per leaf.

  Where a sparse 2-D weight returned here is multiplied by
  :func:`spra.sparse_backward.matmul` (every Linear layer of
  ``spra_jax.models`` does so), the backward pass does not form that dense
  gradient at all: it computes the k entries from the layer's input and
  output cotangent (a sampled product, or the dense one where that is
  cheaper; ``backward`` chooses, see :class:`spra.sparse_backward.Backward`).
  Any other use of the weight takes the dense path above; both add up.

  Differentiate with :func:`grad` or :func:`value_and_grad` (or ``jax.grad``
  with ``allow_int=True``, since the delta carries its int32 indices).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> params = {'w': jnp.arange(6.).reshape(2, 3)}
    >>> delta = spra.init_delta(spra.masks.from_dense({'w': jnp.array([[1, 0, 0], [0, 0, 1]], bool)}))
    >>> loss = lambda delta: (spra.attach(params, delta)['w'] ** 2).sum()
    >>> spra.grad(loss)(delta).values['w']   # d/dw of sum(w**2) = 2w, at [0, 0] and [1, 2]
    Array([ 0., 10.], dtype=float32)
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"attach expects a SparseDelta, got {type(delta).__name__}.")
  validate(delta.mask, params, check_indices=False)

  def one(m: LeafMask, w: Any, v: Any):
    if m.kind == FROZEN:
      return w
    if m.kind == FULL:
      return _through_full(w, v)
    out = _through_sparse(w, v, m.indices, m.blocks)
    sparse_backward.register(out, w, v, m, backward)
    return out

  backward = sparse_backward.as_backward(backward)
  return compact.map_leaves(one, delta.mask, params, delta.values)


def _restore_indices(primal: Any, cotangent: Any) -> Any:
  """Puts each SparseDelta's indices back where ``allow_int`` left float0."""
  is_delta = lambda x: isinstance(x, SparseDelta)
  return jax.tree.map(
      lambda p, c: SparseDelta(p.mask, c.values) if is_delta(p) else c, primal, cotangent, is_leaf=is_delta
  )


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, **kwargs: Any) -> Callable:
  """``jax.value_and_grad`` for functions of :class:`SparseDelta` arguments.

  The values of each delta are differentiated; its indices are carried into
  the gradient unchanged, so the gradient of a ``SparseDelta`` is a
  ``SparseDelta`` with the same mask. Other integer leaves get ``float0``
  gradients, as with ``jax.grad(..., allow_int=True)``.

  Example:

    >>> import jax.numpy as jnp
    >>> import spra_jax as spra
    >>> params = {'w': jnp.ones((2, 2))}
    >>> delta = spra.init_delta(spra.masks.from_dense({'w': jnp.eye(2, dtype=bool)}))
    >>> loss, g = spra.value_and_grad(lambda d: spra.attach(params, d)['w'].sum())(delta)
    >>> float(loss), g.values['w'].tolist(), g.mask['w'].indices.tolist()
    (4.0, [1.0, 1.0], [0, 3])
  """
  vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, allow_int=True, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    out, grads = vg(*args, **kw)
    if isinstance(argnums, int):
      return out, _restore_indices(args[argnums], grads)
    return out, tuple(_restore_indices(args[i], g) for i, g in zip(argnums, grads))

  return wrapped


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, **kwargs: Any) -> Callable:
  """``jax.grad`` for functions of :class:`SparseDelta` arguments.

  See :func:`value_and_grad`.

  Example:

    >>> import jax.numpy as jnp
    >>> import spra_jax as spra
    >>> params = {'w': jnp.full((3,), 2.)}
    >>> delta = spra.init_delta(spra.masks.from_dense({'w': jnp.array([False, True, False])}))
    >>> spra.grad(lambda d: (spra.attach(params, d)['w'] ** 3).sum())(delta).values['w']
    Array([12.], dtype=float32)
  """
  vg = value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    out, grads = vg(*args, **kw)
    return (grads, out[1]) if has_aux else grads

  return wrapped


def apply_updates(params: Any, delta: SparseDelta, updates: Any, *, base: Any = None) -> tuple[Any, SparseDelta]:
  """Adds compact ``updates`` to the delta and, in place, to the parameters.

  Returns ``(params, delta)`` with ``delta.values + updates`` and the same
  change written into ``params`` at the mask's entries (summed in float32,
  rounded once to each parameter's dtype). Under ``jax.jit`` with ``params``
  and ``delta`` donated, XLA updates both buffers in place, so no second copy
  of the weights exists: the parameters stay equal to base + delta (up to the
  parameter dtype's rounding; the delta keeps its own float32 values, and
  ``merge(base, delta)`` rebuilds the weights from them exactly).

  For weights narrower than float32, adding each step's update rounds it
  away when it is below half the dtype's spacing (3.9e-3 at 1.0 in bf16).
  Give ``base``, the base values at the mask's entries
  (:func:`spra.precision.base_entries`; None for a leaf adds as above), and
  those entries are *written* as ``round(base + delta)`` instead: the
  weights then equal ``merge(base_params, delta)`` bit for bit, whatever
  the size of each step's update. Frozen entries are never written.

  ``updates`` has the structure of ``delta.values``: what an Optax
  transformation returns when it runs on ``delta.values``.

  Where to call it matters for memory. Called at the *end* of a jitted step,
  after the backward pass has read the weights, the in-place write is not
  ordered after those reads, and XLA copies the weights to keep them intact.
  Called at the *start* of the next step, before anything reads the weights,
  it writes in place. :func:`spra.lean_step` builds steps that way.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> import spra_jax as spra
    >>> params = {'w': jnp.ones((2, 2))}
    >>> delta = spra.init_delta(spra.masks.from_dense({'w': jnp.eye(2, dtype=bool)}))
    >>> tx = optax.sgd(0.5)
    >>> opt_state = tx.init(delta.values)
    >>> grads = spra.grad(lambda d: spra.attach(params, d)['w'].sum())(delta)
    >>> updates, opt_state = tx.update(grads.values, opt_state, delta.values)
    >>> params, delta = spra.apply_updates(params, delta, updates)
    >>> params['w'].tolist(), delta.values['w'].tolist()
    ([[0.5, 1.0], [1.0, 0.5]], [-0.5, -0.5])
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"apply_updates expects a SparseDelta, got {type(delta).__name__}.")

  def add(m: LeafMask, v: Any, u: Any):
    if m.kind == FROZEN:
      return None
    return (v.astype(_accumulate_dtype(v.dtype)) + u.astype(_accumulate_dtype(v.dtype))).astype(v.dtype)

  new_values = compact.map_leaves(add, delta.mask, delta.values, updates)
  if base is None:
    return merge(params, SparseDelta(delta.mask, updates)), delta.replace(values=new_values)

  def write(m: LeafMask, x: Any, v: Any, u: Any, b: Any):
    if m.kind == FROZEN or b is None:  # no base kept for this leaf: add the update, as without a base
      return _add_leaf(m, x, u)
    acc = _accumulate_dtype(x.dtype)
    exact = (b.astype(acc) + v.astype(acc)).astype(x.dtype)  # base + delta, rounded once
    return exact if m.kind == FULL else compact.put(x, m, exact)

  new_params = compact.map_leaves(write, delta.mask, params, new_values, updates, base)
  return new_params, delta.replace(values=new_values)
