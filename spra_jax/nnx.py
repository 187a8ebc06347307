"""The lean path for Flax NNX models: a module whose only trainables are deltas.

:class:`SparseAdapter` wraps an NNX model and a mask sampled on its
``nnx.Param`` state. Its delta values are :class:`DeltaValue` variables (a
subclass of ``nnx.Param``), so ``nnx.grad`` with
``nnx.DiffState(0, spra.nnx.DeltaValue)`` and
``nnx.Optimizer(adapter, tx, wrt=spra.nnx.DeltaValue)`` see only the k values
per leaf. The forward pass goes through :func:`spra.attach`, so no dense weight
gradient outlives its layer.

The wrapped model's weights are kept equal to base + delta. Each call first
writes the change of the deltas since the last call into the weights (in place
under ``nnx.jit`` with donation), and only then reads them: the write that an
optimizer step implies lands at the start of the next forward pass.
:meth:`SparseAdapter.sync` writes it at any other time (before saving or
evaluating the bare model).

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import spra_jax as spra
  >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  >>> mask = spra.sample_mask(0, nnx.state(model, nnx.Param), density=0.25, include='kernel')
  >>> adapter = spra.nnx.SparseAdapter(model, mask)
  >>> optimizer = nnx.Optimizer(adapter, optax.adam(1e-2), wrt=spra.nnx.DeltaValue)
  >>> def loss_fn(adapter, x):
  ...   return (adapter(x) ** 2).mean()
  >>> @nnx.jit
  ... def train_step(adapter, optimizer, x):
  ...   loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, spra.nnx.DeltaValue))(adapter, x)
  ...   optimizer.update(adapter, grads)
  ...   return loss
  >>> x = jnp.ones((2, 8))
  >>> losses = [float(train_step(adapter, optimizer, x)) for _ in range(5)]
  >>> losses[-1] < losses[0]
  True
  >>> sum(v.size for v in jax.tree.leaves(nnx.state(adapter, spra.nnx.DeltaValue)))
  8

Without the adapter, :func:`spra.masked` is the transformation of a plain
``nnx.Optimizer`` over the model's ``nnx.Param``: the gradients are dense (one
per weight, as ``nnx.grad`` forms them), the optimizer state is O(k), and
:func:`spra.mask_of` reads the mask from ``optimizer.opt_state``:

  >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, spra.masked(optax.adam(1e-2), density=0.25, key=0), wrt=nnx.Param)
  >>> @nnx.jit
  ... def dense_step(model, optimizer, x):
  ...   loss, grads = nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(model)
  ...   optimizer.update(model, grads)
  ...   return loss
  >>> losses = [float(dense_step(model, optimizer, x)) for _ in range(5)]
  >>> losses[-1] < losses[0], spra.num_trainable(spra.mask_of(optimizer.opt_state))
  (True, 9)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spra_jax.delta import SparseDelta, attach, init_delta, merge
from spra_jax.masks import validate

__all__ = ["DeltaValue", "DeltaIndices", "DeltaApplied", "SparseAdapter"]


class DeltaValue(nnx.Param):
  """Trainable values of a sparse delta (k per sparse leaf)."""


class DeltaIndices(nnx.Variable):
  """The int32 flat indices of a sparse delta; never trained."""


class DeltaApplied(nnx.Variable):
  """The delta values already written into the wrapped model's weights."""


class SparseAdapter(nnx.Module):
  """An NNX model whose trainable state is a sparse delta over its weights.

  Args:
    model: the NNX model; its ``nnx.Param`` weights are the base and are
      updated in place to stay equal to base + delta.
    mask: a mask sampled on ``nnx.state(model, nnx.Param)``, or a
      :class:`spra.SparseDelta` whose values the weights already include
      (to resume).
    dtype: dtype of the delta values (float32 by default).
    backward: how the sparse weight gradients are computed (see
      :func:`spra.lean_step`; default ``'auto'``).

  Calling the adapter calls the model. :meth:`delta` returns the current
  :class:`spra.SparseDelta`, for saving or merging elsewhere.
  """

  def __init__(self, model: nnx.Module, mask: Any, *, dtype: Any = jnp.float32, backward: Any = None):
    delta = mask if isinstance(mask, SparseDelta) else init_delta(mask, dtype)
    validate(delta.mask, nnx.state(model, nnx.Param))
    indices, self._mask_def = jax.tree.flatten(delta.mask)
    values, self._values_def = jax.tree.flatten(delta.values)
    self.model = model
    self.indices = nnx.List([DeltaIndices(i) for i in indices])
    self.values = nnx.List([DeltaValue(v) for v in values])
    self.applied = nnx.List([DeltaApplied(jnp.asarray(v)) for v in values])
    self.backward = backward

  def delta(self) -> SparseDelta:
    """The current delta (indices and values)."""
    mask = jax.tree.unflatten(self._mask_def, [v[...] for v in self.indices])
    return SparseDelta(mask, jax.tree.unflatten(self._values_def, [v[...] for v in self.values]))

  def sync(self) -> None:
    """Writes the delta's change since the last write into the model's weights."""
    delta = self.delta()
    change = [jax.lax.stop_gradient(v[...] - a[...]) for v, a in zip(self.values, self.applied)]
    if not change:
      return
    params = nnx.state(self.model, nnx.Param)
    params = merge(params, SparseDelta(delta.mask, jax.tree.unflatten(self._values_def, change)))
    nnx.update(self.model, params)
    for v, a in zip(self.values, self.applied):
      a[...] = jax.lax.stop_gradient(v[...])

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    self.sync()
    graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
    attached = attach(params, self.delta(), backward=self.backward)
    return nnx.merge(graphdef, attached, rest)(*args, **kwargs)
