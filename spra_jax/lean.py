"""The memory-lean training step: differentiate only the sparse deltas.

``jax.grad`` over the full parameters forms a dense gradient for every weight,
all alive at once before the optimizer runs. The lean step differentiates the
delta values instead: :func:`spra.attach` gathers each weight's k gradient
entries right where the backward pass forms that weight's gradient, so the step
holds at most one layer's dense weight gradient, and the optimizer state covers
k values per leaf.

The parameters are updated in place and always hold base + delta. The write
for step t's update happens at the *start* of step t + 1, before anything reads
the weights (``pending`` in :class:`LeanState`). Written at the end of step t,
after the backward pass had read the weights, it would force XLA to copy all
the weights. :meth:`LeanStep.flush` writes the pending update at any time.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> import spra_jax as spra
  >>> params = {'w': jnp.ones((8, 8)), 'b': jnp.zeros(8)}
  >>> def loss_fn(params, x, y):
  ...   return ((x @ params['w'] + params['b'] - y) ** 2).mean()
  >>> mask = spra.sample_mask(jax.random.key(0), params, density=0.25, full='b')
  >>> step = spra.lean_step(loss_fn, optax.adam(1e-2))
  >>> state = step.init(jax.tree.map(jnp.copy, params), mask)  # the step donates them
  >>> x, y = jnp.ones((4, 8)), jnp.zeros((4, 8))
  >>> for _ in range(3):
  ...   state, loss = step(state, x, y)
  >>> state = step.flush(state)
  >>> params_now = state.params
  >>> bool(jnp.allclose(params_now['w'], spra.merge(params, state.delta)['w']))
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spra_jax import microbatch, precision, sparse_backward
from spra_jax.delta import SparseDelta, apply_updates, attach, init_delta, value_and_grad
from spra_jax.masks import validate

__all__ = ["LeanState", "LeanStep", "lean_step"]


class LeanState(NamedTuple):
  """State of a :func:`lean_step` training run.

  Attributes:
    params: the weights, base + delta (in place, donated each step).
    delta: the sparse delta trained so far (indices and float32 values).
    opt_state: the optimizer's state over ``delta.values`` (O(k)).
    pending: the last step's compact update, written into ``params`` and
      ``delta`` at the start of the next step (or by :meth:`LeanStep.flush`).
    step: number of steps taken.
    base: the base weights at the mask's entries of every leaf narrower than
      float32 (a compact tree, None per other leaf; None when there are none
      or the step was built with ``masters=False``). Those entries are written
      as ``round(base + delta)``, so no update is lost to rounding.
  """

  params: Any
  delta: SparseDelta
  opt_state: optax.OptState
  pending: Any
  step: jax.Array
  base: Any = None


# The state's shardings, or how to get them from the initial state (see lean_step).
StateShardings = LeanState | Callable[[LeanState], LeanState]


class LeanStep:
  """A jitted, donated SpaRTA training step that differentiates deltas only.

  Build it with :func:`lean_step`.
  """

  def __init__(self, loss_fn: Callable, tx: optax.GradientTransformation, *, has_aux: bool, donate: bool, jit: bool,
               state_shardings: StateShardings | None = None, masters: bool = True, microbatches: int = 1,
               split_args: Any = None, backward: sparse_backward.Backward | str | None = None):
    self.loss_fn = loss_fn
    self.tx = tx
    self.has_aux = has_aux
    self.masters = masters
    self.microbatches = microbatch.check_microbatches(microbatches)
    self.split_args = None if split_args is None else tuple(split_args)
    self.backward = sparse_backward.as_backward(backward)
    self._jit = jit
    # A function is resolved by init, from the state it builds; a LeanState of shardings is used as given.
    self._shardings_of = state_shardings if callable(state_shardings) else None
    self._state_shardings = None if callable(state_shardings) else state_shardings
    wrap = (lambda f: jax.jit(f, donate_argnums=0 if donate else ())) if jit else (lambda f: f)
    self._step = wrap(self._step_impl)
    self._flush = wrap(self._flush_impl)

  @property
  def state_shardings(self) -> LeanState | None:
    """The ``NamedSharding`` of every leaf of the state (see :func:`lean_step`), or None if the step has none.

    Given to :func:`lean_step` as a function, it is known once :meth:`init` has run.
    """
    return self._state_shardings

  def init(self, params: Any, mask_or_delta: Any, *, dtype: Any = jnp.float32, base: Any = None) -> LeanState:
    """The initial state for ``params`` and a mask (or a delta to resume from).

    With a mask, the delta starts at zero and ``params`` are the base weights.
    With a :class:`SparseDelta`, ``params`` must already hold base + delta;
    if some trained leaves are narrower than float32 (and ``masters`` is on),
    also give ``base``, the base weights (they cannot be recovered exactly
    from rounded ones). A whole saved ``LeanState`` (``spra.checkpoint.TrainCheckpointer``)
    holds its base entries and resumes bit-exactly without it.

    IMPORTANT: the step updates the weights in place: with ``donate=True`` the
    arrays of ``params`` are donated to the first step and become unusable
    (the mask or delta given here is copied, and stays usable).
    Keep a copy (``jax.tree.map(jnp.copy, params)``) if you need the base
    weights afterwards, or rebuild them with ``spra.unmerge``.
    """
    resuming = isinstance(mask_or_delta, SparseDelta)
    delta = mask_or_delta if resuming else init_delta(mask_or_delta, dtype)
    validate(delta.mask, params)
    base_entries = None
    if base is not None:
      validate(delta.mask, base)
    if self.masters:
      base_entries = precision.base_entries(params if base is None else base, delta.mask)
      if resuming and base is None and base_entries is not None:
        raise ValueError(
            "resuming from a delta with weights narrower than float32 needs base= (the base weights): the trained "
            "entries are written as round(base + delta), and rounded weights do not give the base back. Restore "
            "the whole LeanState with spra.checkpoint.TrainCheckpointer instead, or build the step with masters=False.")
      # A copy: a full leaf's entries are the weight array itself, which the first step takes over.
      base_entries = jax.tree.map(jnp.copy, base_entries)
    # The step donates its state. Copy the delta (O(k)) so the caller's mask
    # and delta stay usable; only the weights are handed over.
    delta = jax.tree.map(jnp.copy, delta)
    pending = jax.tree.map(jnp.zeros_like, delta.values)
    state = LeanState(params, delta, self.tx.init(delta.values), pending, jnp.zeros((), jnp.int32), base_entries)
    if self._shardings_of is not None:
      self._state_shardings = self._shardings_of(state)
    if self._state_shardings is None:
      return state
    return jax.device_put(state, self._state_shardings)

  def _keep_layout(self, state: LeanState) -> LeanState:
    """``state`` constrained to the step's shardings (unchanged without), so that the donated buffers are reused."""
    if self._state_shardings is None:
      if self._shardings_of is not None:
        raise ValueError("call step.init(params, mask) before stepping: it fixes the state's shardings.")
      return state
    return jax.lax.with_sharding_constraint(state, self._state_shardings)

  def _step_impl(self, state: LeanState, *batch: Any):
    params, delta = apply_updates(state.params, state.delta, state.pending, base=state.base)

    def value_and_compact_grad(*batch):
      out, grads = value_and_grad(lambda d: self.loss_fn(attach(params, d, backward=self.backward), *batch), has_aux=self.has_aux)(delta)
      return out, grads.values  # the values only: the indices are not summed over microbatches

    out, grads = microbatch.accumulate(value_and_compact_grad, self.microbatches, batch, split=self.split_args,
                                       has_aux=self.has_aux)
    updates, opt_state = self.tx.update(grads, state.opt_state, delta.values)
    new_state = self._keep_layout(LeanState(params, delta, opt_state, updates, state.step + 1, state.base))
    if self.has_aux:
      loss, aux = out
      return new_state, loss, aux
    return new_state, out

  def __call__(self, state: LeanState, *batch: Any):
    """One step: returns ``(state, loss)``, or ``(state, loss, aux)`` with ``has_aux``.

    The state passed in is donated (its buffers are reused): use the returned one.
    """
    return self._step(state, *batch)

  def lower(self, state: LeanState, *batch: Any):
    """The lowered step for ``state`` and ``batch`` (``.compile().as_text()`` gives its HLO); runs nothing.

    Raises:
      ValueError: if the step was built with ``jit=False``.
    """
    if not self._jit:
      raise ValueError("lower needs a jitted step; this one was built with jit=False.")
    return self._step.lower(state, *batch)

  def _flush_impl(self, state: LeanState) -> LeanState:
    params, delta = apply_updates(state.params, state.delta, state.pending, base=state.base)
    state = state._replace(params=params, delta=delta, pending=jax.tree.map(jnp.zeros_like, state.pending))
    return self._keep_layout(state)

  def flush(self, state: LeanState) -> LeanState:
    """Writes the pending update, so that ``state.params`` is current.

    Call it before evaluating or saving; training can go on from the result.
    """
    return self._flush(state)


def lean_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    jit: bool = True,
    state_shardings: StateShardings | None = None,
    masters: bool = True,
    microbatches: int = 1,
    split_args: Any = None,
    backward: sparse_backward.Backward | str | None = None,
) -> LeanStep:
  """Builds the memory-lean SpaRTA training step.

  With ``state_shardings`` the state lives on a device mesh: :meth:`LeanStep.init`
  places it on them, and every step and :meth:`LeanStep.flush` constrain the
  state they return to the same shardings, so the outputs keep the inputs'
  shardings step after step, nothing is resharded between steps, and the
  donated buffers are reused in place. What must hold: one ``NamedSharding``
  per leaf of the state ``init`` builds, consistent with the parameters'
  shardings, which is what :func:`spra.sharding.lean_state_shardings` gives
  (``init`` moves parameters that are elsewhere); and, for the optimizer to
  need no communication, a mask that is shard-local for them (sampled on the
  sharded parameters). A function given instead is called by ``init`` on the
  state it has built, each time ``init`` runs. Batches are not constrained:
  place them yourself (:func:`spra.sharding.batch_sharding`).
  :func:`spra.sharding.sharded_lean_step` is this step with the shardings read
  from the parameters given to ``init``.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``); any pure function of the parameter pytree.
    tx: an Optax transformation; it runs on the compact delta values. Weight
      decay therefore pulls the *delta* towards zero, i.e. the model towards
      its base weights (``spra.masked`` decays the parameter values instead).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the state to the jitted step so params update in place.
    jit: jit the step (turn off to debug).
    state_shardings: None (the state stays where JAX puts it), a
      :class:`LeanState` of ``NamedSharding`` with one entry per leaf of the
      state, or a function that ``init`` calls on the initial state to get one.
    masters: for weights narrower than float32 (bf16, f16), keep their base
      values at the mask's entries (O(k), ``LeanState.base``) and write the
      trained entries as ``round(base + delta)`` each step, so that updates
      below half the dtype's spacing still move the model. Off, each step's
      update is added to the weight and may round away. No effect on float32.
    microbatches: gradient accumulation: each step splits its batch into this
      many microbatches (rows ``j, j + n, ...``, see :mod:`spra.microbatch`)
      and sums their compact gradients before one optimizer update.
    split_args: which positional ``batch`` arguments of the step are split
      into microbatches (default: all); e.g. ``(1,)`` when argument 0 is a
      tree of frozen variables.
    backward: how the weight gradients of sparse leaves multiplied by
      :func:`spra.sparse_backward.matmul` (every Linear layer of
      ``spra_jax.models``) are computed: ``'auto'`` (default: per leaf, by the
      cost model of :class:`spra.sparse_backward.Backward`), ``'sampled'``
      (only the k entries, never the dense product) or ``'dense'``; or a
      ``Backward``. Other uses of the weights take the dense path.

  Returns:
    A :class:`LeanStep`: ``state = step.init(params, mask)``, then
    ``state, loss = step(state, *batch)``, and ``step.flush(state)``.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> import spra_jax as spra
    >>> params = {'w': jnp.zeros((4, 2))}
    >>> mask = spra.sample_mask(0, params, density=0.5)
    >>> step = spra.lean_step(lambda p, x: (x @ p['w']).sum(), optax.sgd(0.1))
    >>> state, loss = step(step.init(params, mask), jnp.ones((3, 4)))
    >>> jax.tree.map(lambda u: u.shape, state.pending)
    {'w': (4,)}

    On a mesh (here every device, the weights replicated), with the state's
    shardings derived from the parameters' by ``init``:

    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> ps = {'w': NamedSharding(spra.sharding.make_mesh(), P())}
    >>> step = spra.lean_step(lambda p, x: (x @ p['w']).sum(), optax.sgd(0.1),
    ...                       state_shardings=lambda state: spra.sharding.lean_state_shardings(state, ps))
    >>> state = step.init(jax.device_put({'w': jnp.zeros((4, 2))}, ps), mask)
    >>> state, loss = step(state, jnp.ones((3, 4)))
    >>> state.delta.values['w'].sharding == step.state_shardings.delta.values['w']
    True
  """
  return LeanStep(loss_fn, tx, has_aux=has_aux, donate=donate, jit=jit, state_shardings=state_shardings,
                  masters=masters, microbatches=microbatches, split_args=split_args, backward=backward)
