"""A backward pass whose cost follows the trained entries: weight gradients at the mask only.

For a linear layer ``y = x W`` the dense weight gradient is ``x^T dy``: one
``[in, out]`` product over all tokens, as costly as the forward matmul. SpaRTA
keeps only k of its entries, so most of that work is thrown away. This module
computes the k entries directly from the layer's input and output cotangent:

* **sampled** (any mask: uniform, Bernoulli, magnitude, Fisher, structured,
  shard-local): ``g[i] = sum_t x[t, row_i] * dy[t, col_i]``, a sampled
  dense-dense product of ``2 T k`` FLOPs instead of ``2 T in out``. It runs
  in chunks of tokens and of indices, so its temporaries stay within
  ``chunk_bytes`` (default: the bytes of one float32 copy of the weight);
* **dense**: the usual ``x^T dy`` followed by a gather at the mask, cheaper at
  high density and for tiny layers;
* **structured** (masks of whole rows or whole columns, as ``spra.masks.rows``
  and ``spra.masks.columns`` draw them): a dense product over the selected
  slices only, ``x[:, R]^T dy`` or ``x^T dy[:, C]``, ``2 T k`` FLOPs at matmul
  speed. Whether the indices are whole rows or columns is checked on the
  device (O(k)) where k is a multiple of the row or column length; any other
  mask takes one of the two paths above.

:func:`choose` picks one per leaf, statically, from the shapes, the number of
tokens and k (the cost model: see :class:`Backward`); ``Backward(mode=...)``
overrides it.

How a matmul learns that its weight is sparse-trained: :func:`spra.attach`
records each sparse leaf it returns, and :func:`matmul` / :class:`Linear`
(which every model of ``spra_jax.models`` is built from) look the weight up
there. A weight that was not attached, or that was transformed on the way
(cast to another dtype, reshaped, sliced), is multiplied as usual and its
gradient goes through :func:`spra.attach`'s dense path: always correct, only
not faster. See the README's "Fast backward" section for which paths get it.

Example:

  >>> import jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> params = {'w': jax.random.normal(jax.random.key(0), (64, 32))}
  >>> mask = spra.sample_mask(jax.random.key(1), params, density=0.01)
  >>> x = jax.random.normal(jax.random.key(2), (8, 64))
  >>> def loss(delta):
  ...   w = spra.attach(params, delta)['w']
  ...   return (spra.sparse_backward.matmul(x, w) ** 2).sum()
  >>> fast = spra.grad(loss)(spra.init_delta(mask)).values['w']
  >>> dense = jax.grad(lambda w: ((x @ w) ** 2).sum())(params['w']).reshape(-1)[mask['w'].indices]
  >>> bool(jnp.allclose(fast, dense, rtol=1e-5, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spra_jax import compact
from spra_jax.masks import SPARSE, LeafMask

__all__ = ["Backward", "Linear", "choose", "dense_grad", "is_attached", "matmul", "sampled_grad", "structured_grad"]

SAMPLED = "sampled"
DENSE = "dense"
AUTO = "auto"
_MODES = (AUTO, SAMPLED, DENSE)


@dataclasses.dataclass(frozen=True)
class Backward:
  """How the weight gradient of a sparse-trained matmul is computed.

  Attributes:
    mode: ``'auto'`` (the cost model below picks per leaf), ``'sampled'`` or
      ``'dense'`` (forced for every leaf).
    gather_cost: the cost model's one constant: what one gathered
      multiply-add of the sampled product costs, in multiply-adds of a dense
      matmul. The sampled product is chosen when
      ``gather_cost * k < in * out`` (i.e. below a density of
      ``1 / gather_cost``) and the weight has at least ``min_size`` entries.
      The default, 64 (sampled below about 1.6 % density), is where the two
      paths' step times cross on a 2-core CPU (``examples/benchmarks/step_cost.py
      --sweep`` measures it); XLA's FLOP count always favours the sampled path,
      so set ``mode='sampled'`` to minimise FLOPs rather than time.
    min_size: weights with fewer entries always take the dense product (the
      saving cannot pay for the extra kernels).
    chunk_bytes: bound on the sampled product's temporaries (the gathered
      ``[tokens, indices]`` operands of one chunk); None means a quarter of
      the bytes of a float32 copy of the weight, and at least 1 MiB (about
      the fastest on CPU, where a chunk then stays in cache).
    structured: look for whole-row and whole-column masks (see the module).

  Example:

    >>> choose((1024, 1024), k=10_486, tokens=64)
    'sampled'
    >>> choose((1024, 1024), k=100_000, tokens=64)
    'dense'
    >>> choose((1024, 1024), k=100_000, tokens=64, backward=Backward(mode='sampled'))
    'sampled'
  """

  mode: str = AUTO
  gather_cost: float = 64.0
  min_size: int = 4096
  chunk_bytes: int | None = None
  structured: bool = True

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f"Backward mode must be one of {_MODES}, got {self.mode!r}.")
    if not self.gather_cost > 0:
      raise ValueError(f"Backward gather_cost must be positive, got {self.gather_cost!r}.")
    if self.chunk_bytes is not None and int(self.chunk_bytes) < 1:
      raise ValueError(f"Backward chunk_bytes must be a positive number of bytes or None, got {self.chunk_bytes!r}.")


DEFAULT = Backward()


def as_backward(backward: Backward | str | None) -> Backward:
  """``backward`` as a :class:`Backward` (None: the default; a string: that mode)."""
  if backward is None:
    return DEFAULT
  if isinstance(backward, str):
    return Backward(mode=backward)
  if not isinstance(backward, Backward):
    raise TypeError(f"backward must be a spra.sparse_backward.Backward, a mode string or None, "
                    f"got {type(backward).__name__}.")
  return backward


def choose(shape: tuple[int, int], *, k: int, tokens: int, backward: Backward | str | None = None) -> str:
  """``'sampled'`` or ``'dense'``: how the gradient of a ``shape`` weight with k trained entries is computed.

  Static (shapes and counts only), so it is decided once per leaf when the
  step is traced. See :class:`Backward` for the cost model. ``tokens`` does
  not change the choice (both costs are linear in it) but is part of the
  signature so that a finer model can use it.
  """
  del tokens
  backward = as_backward(backward)
  if backward.mode != AUTO:
    return backward.mode
  size = math.prod(shape)
  if size < backward.min_size:
    return DENSE
  return SAMPLED if backward.gather_cost * k < size else DENSE


# --------------------------------------------------------------------------
# The two ways to the k gradient entries.
# --------------------------------------------------------------------------


def _chunk_bytes(backward: Backward, shape: tuple[int, int]) -> int:
  if backward.chunk_bytes is not None:
    return int(backward.chunk_bytes)
  return max(math.prod(shape), 1 << 20)  # a quarter of 4 bytes per entry


def sampled_grad(x: jax.Array, dy: jax.Array, indices: jax.Array, out_features: int, *,
                 chunk_bytes: int = 1 << 22) -> jax.Array:
  """The entries ``(x^T dy).reshape(-1)[indices]`` without forming ``x^T dy``, in float32.

  ``g[i] = sum_t x[t, row_i] * dy[t, col_i]`` with ``row_i, col_i =
  divmod(indices[i], out_features)``, over every token ``t`` (all leading
  dimensions of ``x`` [..., in] and ``dy`` [..., out]). Works on the
  transposed activations, so each gathered operand is a contiguous row of
  tokens. Indices are processed in chunks (and tokens too, for very long
  batches) so that the two gathered operands of a chunk hold at most about
  ``chunk_bytes``.

  NOTE: XLA's cost analysis counts the body of a loop once, so with more than
  one chunk ``compiled.cost_analysis()['flops']`` undercounts this product
  (its true count is ``2 T k``); compile with one chunk to count it.

  Example:

    >>> import jax.numpy as jnp
    >>> x, dy = jnp.arange(6.).reshape(3, 2), jnp.ones((3, 4))
    >>> sampled_grad(x, dy, jnp.array([1, 6], jnp.int32), 4)   # (x^T dy)[0, 1] and [1, 2]
    Array([6., 9.], dtype=float32)
  """
  xt = jnp.reshape(x, (-1, x.shape[-1])).T  # [in, T]: row r holds feature r over all tokens
  dyt = jnp.reshape(dy, (-1, dy.shape[-1])).T  # [out, T]
  tokens, k = xt.shape[1], indices.shape[0]
  # Flat indices are non-negative: truncating division is floor division, without its sign fix-ups.
  rows, cols = jax.lax.div(indices, out_features), jax.lax.rem(indices, out_features)
  # Two gathered [chunk_k, chunk_t] operands in float32 per chunk.
  per_entry = 2 * 4
  min_k = min(k, 64)
  chunk_t = tokens if per_entry * tokens * min_k <= chunk_bytes else max(1, chunk_bytes // (per_entry * min_k))
  chunk_k = max(1, min(k, chunk_bytes // (per_entry * chunk_t)))

  def over_indices(xt_part, dyt_part):
    def one(rc):
      r, c = rc
      a = xt_part.at[r].get(mode="promise_in_bounds").astype(jnp.float32)
      b = dyt_part.at[c].get(mode="promise_in_bounds").astype(jnp.float32)
      return jnp.sum(a * b, axis=1)

    if chunk_k >= k:
      return one((rows, cols))
    n = -(-k // chunk_k)
    pad = n * chunk_k - k  # padded entries read row 0 / column 0 and are dropped
    r = jnp.pad(rows, (0, pad)).reshape(n, chunk_k)
    c = jnp.pad(cols, (0, pad)).reshape(n, chunk_k)
    return jax.lax.map(one, (r, c)).reshape(-1)[:k]

  if chunk_t >= tokens:
    return over_indices(xt, dyt)
  n_t = -(-tokens // chunk_t)
  pad_t = n_t * chunk_t - tokens  # zero tokens add nothing
  xt = jnp.pad(xt, ((0, 0), (0, pad_t)))
  dyt = jnp.pad(dyt, ((0, 0), (0, pad_t)))

  def body(i, acc):
    start = i * chunk_t
    xs = jax.lax.dynamic_slice_in_dim(xt, start, chunk_t, axis=1)
    ds = jax.lax.dynamic_slice_in_dim(dyt, start, chunk_t, axis=1)
    return acc + over_indices(xs, ds)

  return jax.lax.fori_loop(0, n_t, body, jnp.zeros((k,), jnp.float32))


def _whole_rows(indices: jax.Array, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """(whether sorted ``indices`` are whole rows, those rows); needs ``k % shape[1] == 0``."""
  n, out = indices.shape[0] // shape[1], shape[1]
  rows = jax.lax.div(indices[::out], out)
  expect = (rows[:, None] * out + jnp.arange(out, dtype=indices.dtype)).reshape(-1)
  return jnp.all(indices == expect) & (n > 0), rows


def _whole_columns(indices: jax.Array, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """(whether sorted ``indices`` are whole columns, those columns); needs ``k % shape[0] == 0``."""
  n, (rows, out) = indices.shape[0] // shape[0], shape
  cols = indices[:n]
  expect = (jnp.arange(rows, dtype=indices.dtype)[:, None] * out + cols[None, :]).reshape(-1)
  return jnp.all(indices == expect) & (n > 0), cols


def structured_grad(x: jax.Array, dy: jax.Array, mask: LeafMask, fallback: Any) -> jax.Array:
  """The entries of ``x^T dy`` at ``mask`` by a dense product over its rows or columns, if it is made of them.

  ``fallback(x, dy)`` computes them otherwise (chosen on the device: the
  check is O(k)). Only sorted masks (not shard-local) of whole rows or
  columns of a 2-D leaf are recognised.

  Example:

    >>> import jax.numpy as jnp
    >>> x, dy = jnp.arange(6.).reshape(3, 2), jnp.ones((3, 4))
    >>> rows = LeafMask.sparse((2, 4), jnp.array([4, 5, 6, 7], jnp.int32))   # row 1
    >>> structured_grad(x, dy, rows, fallback=None)
    Array([9., 9., 9., 9.], dtype=float32)
  """
  shape, k = mask.shape, mask.num_trainable
  x2 = jnp.reshape(x, (-1, x.shape[-1]))
  dy2 = jnp.reshape(dy, (-1, dy.shape[-1]))
  branches = []
  if mask.indices_sorted and k and k % shape[1] == 0:
    def by_rows(rows):  # x[:, R]^T dy: [n, out], row-major like the sorted indices
      picked = x2.T.at[rows].get(mode="promise_in_bounds")  # [n, T]
      return jax.lax.dot_general(picked, dy2, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32).reshape(-1)
    branches.append((_whole_rows, by_rows))
  if mask.indices_sorted and k and k % shape[0] == 0:
    def by_columns(cols):  # x^T dy[:, C]: [in, n]
      picked = dy2.T.at[cols].get(mode="promise_in_bounds")  # [n, T]
      return jax.lax.dot_general(x2, picked, (((0,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).reshape(-1)
    branches.append((_whole_columns, by_columns))
  if not branches:
    return fallback(x, dy)
  result = None
  for test, compute in reversed(branches):
    ok, which = test(mask.indices, shape)
    if fallback is None and result is None:  # no other way: the mask must be of this structure
      result = compute(which)
      continue
    other = (lambda: fallback(x, dy)) if result is None else (lambda r=result: r)
    result = jax.lax.cond(ok, lambda w=which, c=compute: c(w), other)
  return result


def dense_grad(x: jax.Array, dy: jax.Array, mask: LeafMask) -> jax.Array:
  """The entries of ``x^T dy`` at a sparse mask, by the dense product then a gather (float32).

  Example:

    >>> import jax.numpy as jnp
    >>> x, dy = jnp.arange(6.).reshape(3, 2), jnp.ones((3, 4))
    >>> dense_grad(x, dy, LeafMask.sparse((2, 4), jnp.array([1, 6], jnp.int32)))
    Array([6., 9.], dtype=float32)
  """
  x2 = jnp.reshape(x, (-1, x.shape[-1]))
  dy2 = jnp.reshape(dy, (-1, dy.shape[-1]))
  full = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return compact.take(full, mask)


# --------------------------------------------------------------------------
# The matmul with a masked weight gradient.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_matmul(x: jax.Array, weight: jax.Array, values: jax.Array, indices: jax.Array, static: tuple) -> jax.Array:
  return _forward(x, weight, static)


def _forward(x, weight, static):
  dtype, precision = static[3], static[4]
  return jax.lax.dot_general(x.astype(dtype), weight.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                             precision=precision)


def _masked_matmul_fwd(x, weight, values, indices, static):
  # Residuals: the input (which the dense backward keeps too), the weight (alive anyway) and the indices.
  return _forward(x, weight, static), (x, weight, jnp.zeros((0,), values.dtype), indices)


def _masked_matmul_bwd(static, residuals, dy):
  path, blocks, chunk, dtype, precision, structured = static
  x, weight, values_dtype, indices = residuals
  w = weight.astype(dtype)
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision).astype(x.dtype)
  mask = LeafMask.sparse(weight.shape, indices, blocks=blocks)
  if path == SAMPLED:
    unstructured = lambda x, dy: sampled_grad(x, dy, indices, weight.shape[1], chunk_bytes=chunk)
  else:
    unstructured = lambda x, dy: dense_grad(x, dy, mask)
  xc = x.astype(dtype)
  g = structured_grad(xc, dy, mask, unstructured) if structured else unstructured(xc, dy)
  return dx, None, g.astype(values_dtype.dtype), None


_masked_matmul.defvjp(_masked_matmul_fwd, _masked_matmul_bwd)


# --------------------------------------------------------------------------
# Which weights are sparse-trained: recorded by spra.attach.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Attached:
  ref: weakref.ref  # the array attach returned (the lookup key); the entry dies with it
  weight: jax.Array  # the weight itself, without attach's gradient path
  values: jax.Array  # the delta values this weight's gradient flows to
  mask: LeafMask
  backward: Backward


_REGISTRY: dict[int, _Attached] = {}
_LOCK = threading.Lock()


def _forget(key: int, ref: weakref.ref) -> None:
  with _LOCK:
    entry = _REGISTRY.get(key)
    if entry is not None and entry.ref is ref:
      del _REGISTRY[key]


def register(attached: Any, weight: Any, values: Any, mask: LeafMask, backward: Backward | str | None) -> None:
  """Records that ``attached`` (returned by :func:`spra.attach`) is ``weight`` trained at ``mask`` into ``values``.

  Only traced, 2-D, sparse leaves are recorded: outside a trace there is no
  backward pass to speed up (and ``attached`` is then ``weight`` itself, which
  must keep its ordinary gradient).
  """
  if mask.kind != SPARSE or len(mask.shape) != 2 or attached is weight or not isinstance(attached, jax.core.Tracer):
    return
  key = id(attached)
  ref = weakref.ref(attached, lambda r, key=key: _forget(key, r))
  with _LOCK:
    _REGISTRY[key] = _Attached(ref, weight, values, mask, as_backward(backward))


def _lookup(w: Any) -> _Attached | None:
  entry = _REGISTRY.get(id(w))
  if entry is None or entry.ref() is not w:
    return None
  return entry


def is_attached(w: Any) -> bool:
  """Whether ``w`` is a sparse-trained weight that :func:`matmul` computes the fast backward for."""
  return _lookup(w) is not None


def matmul(x: jax.Array, w: jax.Array, *, dtype: Any = None, precision: Any = None) -> jax.Array:
  """``x @ w`` for ``x`` [..., in] and ``w`` [in, out], with the weight gradient taken at the mask only.

  When ``w`` is a sparse leaf returned by :func:`spra.attach` (inside the
  function being differentiated), the backward pass computes the gradient of
  its k trained entries directly (:func:`choose`), never the dense
  ``[in, out]`` product. Any other ``w`` is an ordinary matmul.

  Args:
    x: the input, [..., in].
    w: the weight, [in, out].
    dtype: the dtype to compute in (both operands are cast to it); None: their
      promoted dtype.
    precision: passed to ``jax.lax.dot_general``.
  """
  entry = _lookup(w)
  if dtype is None:
    dtype = jnp.result_type(x, w)
  if entry is None or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                               precision=precision)
  mask, backward = entry.mask, entry.backward
  tokens = math.prod(x.shape[:-1])
  path = choose(mask.shape, k=mask.num_trainable, tokens=tokens, backward=backward)
  static = (path, mask.blocks, _chunk_bytes(backward, mask.shape), jnp.dtype(dtype), precision, backward.structured)
  return _masked_matmul(x, entry.weight, entry.values, mask.indices, static)


class Linear(nnx.Linear):
  """``nnx.Linear`` whose kernel gradient is taken at the mask only when the kernel is sparse-trained.

  The same parameters, initialisers and outputs as ``nnx.Linear``; under
  :func:`spra.attach` (``spra.lean_step``, ``SparseAdapter``, the job) its
  backward pass uses :func:`matmul`. Every model in ``spra_jax.models`` is
  built from it.

  Example:

    >>> from flax import nnx
    >>> layer = Linear(4, 2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 4))).shape, isinstance(layer, nnx.Linear)
    ((3, 2), True)
  """

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    kernel = self.kernel.get_value()
    if out_sharding is not None or self.preferred_element_type is not None or not is_attached(kernel):
      return super().__call__(inputs, out_sharding=out_sharding)
    bias = self.bias.get_value() if self.bias is not None else None
    dtype = self.dtype if self.dtype is not None else jnp.result_type(inputs, kernel)
    y = matmul(inputs, kernel, dtype=dtype, precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y
