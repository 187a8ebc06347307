"""Jitted, donated training steps whose outputs keep the inputs' shardings, for both doors.

:func:`sharded_train_step` takes a dense gradient and any Optax transformation
(``spra.masked`` or full fine-tuning); :func:`sharded_lean_step` is the lean
path, :func:`spra.lean_step` with its state kept on the parameters' shardings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spra_jax.lean import LeanState, LeanStep, lean_step
from spra_jax.sharding.mesh import _is_sharding, _mesh_of
from spra_jax.sharding.state import lean_state_shardings

__all__ = ["ShardedTrainStep", "sharded_lean_step", "sharded_train_step"]


def sharded_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    param_shardings: Any,
    opt_state_shardings: Any,
    batch_shardings: Any,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable:
  """A jitted step ``(params, opt_state, *batch) -> (params, opt_state, loss[, aux])``.

  Dense ``jax.value_and_grad`` of ``loss_fn(params, *batch)``, then
  ``tx.update`` and ``optax.apply_updates``: use it with ``spra.masked`` (or any
  Optax transformation, e.g. for full fine-tuning). Parameters and optimizer
  state are donated and come back with exactly the shardings they went in with
  (``out_shardings`` = ``in_shardings``), so nothing is resharded between steps.
  The loss (and aux) are replicated.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
    tx: the Optax transformation.
    param_shardings: from :func:`spra.sharding.param_shardings`.
    opt_state_shardings: from :func:`spra.sharding.opt_state_shardings`.
    batch_shardings: one sharding for every batch argument, or a tuple with one per argument.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state``.

  Example:

    >>> import jax, jax.numpy as jnp, optax, spra_jax as spra
    >>> mesh = spra.sharding.make_mesh()
    >>> rules = [(r'w', P(None, 'tensor'))]
    >>> params = spra.sharding.shard_params({'w': jnp.ones((8, 4))}, mesh, rules)
    >>> tx = spra.masked(optax.sgd(0.1), density=0.5, key=0)
    >>> state = tx.init(params)
    >>> ps = spra.sharding.param_shardings(params, mesh, rules)
    >>> ss = spra.sharding.opt_state_shardings(state, ps)
    >>> step = sharded_train_step(lambda p, x: (x @ p['w']).sum(), tx, param_shardings=ps,
    ...                           opt_state_shardings=ss, batch_shardings=spra.sharding.batch_sharding(mesh))
    >>> params, state, loss = step(params, jax.device_put(state, ss), jnp.ones((4, 8)))
    >>> float(jax.block_until_ready(loss))
    128.0
  """
  return ShardedTrainStep(loss_fn, tx, param_shardings=param_shardings, opt_state_shardings=opt_state_shardings,
                          batch_shardings=batch_shardings, has_aux=has_aux, donate=donate)


class ShardedTrainStep:
  """The step :func:`sharded_train_step` builds; call it, or :meth:`lower` it to read its HLO."""

  def __init__(self, loss_fn: Callable, tx: optax.GradientTransformation, *, param_shardings: Any,
               opt_state_shardings: Any, batch_shardings: Any, has_aux: bool, donate: bool):
    self.loss_fn, self.tx, self.has_aux, self.donate = loss_fn, tx, has_aux, donate
    self.param_shardings, self.opt_state_shardings = param_shardings, opt_state_shardings
    self.batch_shardings = batch_shardings
    self._replicated = NamedSharding(_mesh_of(param_shardings), P())
    self._jitted: dict[int, Callable] = {}

  def _step(self, params, opt_state, *batch):
    out, grads = jax.value_and_grad(self.loss_fn, has_aux=self.has_aux)(params, *batch)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, *out) if self.has_aux else (params, opt_state, out)

  def _for(self, n: int) -> Callable:
    if n not in self._jitted:
      bs = self.batch_shardings
      bs = tuple(bs) if isinstance(bs, (tuple, list)) else (bs,) * n
      if len(bs) != n:
        raise ValueError(f"batch_shardings has {len(bs)} entries for {n} batch arguments.")
      outs = (self.param_shardings, self.opt_state_shardings, self._replicated)
      outs += (self._replicated,) if self.has_aux else ()
      self._jitted[n] = jax.jit(self._step, in_shardings=(self.param_shardings, self.opt_state_shardings, *bs),
                                out_shardings=outs, donate_argnums=(0, 1) if self.donate else ())
    return self._jitted[n]

  def __call__(self, params: Any, opt_state: Any, *batch: Any):
    """One step: ``(params, opt_state, loss)`` (plus ``aux`` with ``has_aux``); the inputs are donated.

    Leaves not yet on their sharding (the step count of a fresh ``tx.init``, made off the mesh) are placed there
    first: the step's outputs carry the mesh in their types, and a first call with other types would trace and
    compile the step a second time at the second call.
    """
    params = _placed(params, self.param_shardings)
    opt_state = _placed(opt_state, self.opt_state_shardings)
    return self._for(len(batch))(params, opt_state, *batch)

  def lower(self, params: Any, opt_state: Any, *batch: Any):
    """The lowered step (``.compile().as_text()`` gives its HLO): the program a call with these inputs runs; runs
    nothing."""
    return self._for(len(batch)).lower(_placed(params, self.param_shardings),
                                       _placed(opt_state, self.opt_state_shardings), *batch)


def _placed(tree: Any, shardings: Any) -> Any:
  """``tree`` with each array on its sharding in ``shardings`` (a tree of ``NamedSharding`` with ``tree``'s structure,
  or a prefix of it); arrays already there are passed through untouched, so their buffers can still be donated."""

  def place(sharding, subtree):
    return jax.tree.map(lambda x: x if not isinstance(x, jax.Array) or x.sharding == sharding
                        else jax.device_put(x, sharding), subtree)

  return jax.tree.map(place, shardings, tree, is_leaf=_is_sharding)


def _layout_of_params(state: LeanState) -> LeanState:
  """The shardings of ``state`` that follow those its parameters already have (see :func:`sharded_lean_step`)."""
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  for s in jax.tree.leaves(shardings, is_leaf=_is_sharding):
    if not isinstance(s, NamedSharding):
      raise TypeError(f"sharded_lean_step needs parameters placed with a NamedSharding, got {type(s).__name__}.")
  return lean_state_shardings(state, shardings)


def sharded_lean_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    masters: bool = True,
    microbatches: int = 1,
    split_args: Any = None,
    backward: Any = None,
) -> LeanStep:
  """The lean path (:func:`spra.lean_step`) on sharded parameters.

  ``masters``, ``microbatches``, ``split_args`` and ``backward`` are
  :func:`spra.lean_step`'s (low-precision writes, gradient accumulation, the
  sparse weight gradients). Each microbatch takes rows
  ``j, j + n, ...`` of a batch split over devices along its rows, so every
  device keeps its share of every microbatch.

  It is ``spra.lean_step(loss_fn, tx, state_shardings=...)`` with the state's
  shardings taken, by :meth:`~spra.LeanStep.init`, from the parameters given to
  it: those must be ``jax.Array`` s with a ``NamedSharding`` (e.g. from
  :func:`spra.sharding.shard_params`), and the mask should be sampled on them
  (it is then shard-local). ``init`` places the delta, optimizer state and
  pending update by :func:`spra.sharding.lean_state_shardings`; every step and
  ``flush`` keep the state there (``step.state_shardings``), so the donated
  buffers are reused in place.

  Raises:
    TypeError: from ``init``, if a parameter has no ``NamedSharding``.

  Example:

    >>> import jax, jax.numpy as jnp, optax, spra_jax as spra
    >>> mesh = spra.sharding.make_mesh()
    >>> params = spra.sharding.shard_params({'w': jnp.ones((8, 4))}, mesh, [(r'w', P(None, 'tensor'))])
    >>> mask = spra.sample_mask(0, params, density=0.5)
    >>> step = sharded_lean_step(lambda p, x: (x @ p['w']).sum(), optax.sgd(0.1))
    >>> state = step.init(params, mask)
    >>> state, loss = step(state, jax.device_put(jnp.ones((4, 8)), spra.sharding.batch_sharding(mesh)))
    >>> float(jax.block_until_ready(loss))
    128.0
  """
  return lean_step(loss_fn, tx, has_aux=has_aux, donate=donate, jit=True, state_shardings=_layout_of_params,
                   masters=masters, microbatches=microbatches, split_args=split_args, backward=backward)
