"""Trainers: the compiled training step and forward pass of each kind of method.

A trainer is built once per model structure, loss and optimizer, and then
serves any number of runs (other seeds, masks with the same per-leaf counts,
learning rates of a ``tunable`` optimizer) without compiling again. It holds no
run state: every method takes and returns the run's state explicitly, in the
functional style of Optax and the lean step.

* :class:`LeanTrainer` (SpaRTA and head-only): the memory-lean step
  (:func:`spra.lean_step`, or :func:`spra.sharding.sharded_lean_step` on a
  mesh) over a mask; the weights are updated in place and hold base + delta.
* :class:`DenseTrainer` (LoRA and full fine-tuning): ``jax.value_and_grad``
  of a dense set of variables and the optimizer on them, donated.

Both have the same surface: ``init``, ``step(state, frozen, batch)``,
``finish(state)`` (make the state current before reading it), ``predict``,
``trained_variables``, ``trainable`` and ``opt_state_bytes``.

  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import spra_jax as spra
  >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  >>> call = lambda module, batch: module(batch["x"])
  >>> trainer = LeanTrainer(graphdef, optax.adam(1e-2), task="classification", call=call)
  >>> mask = spra.sample_mask(0, params, density=0.5)
  >>> state = trainer.init(jax.tree.map(jnp.copy, params), mask)
  >>> batch = {"x": jnp.ones((8, 4)), "labels": jnp.zeros(8, jnp.int32)}
  >>> for _ in range(3):
  ...   state, loss = trainer.step(state, rest, batch)
  >>> state = trainer.finish(state)
  >>> trainer.trainable(state), trainer.predict(state, rest, batch).shape
  (5, (8, 2))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx

from spra_jax import microbatch, sharding
from spra_jax.lean import LeanState, lean_step
from spra_jax.masks import num_trainable
from spra_jax.recipes.losses import call_model, loss_for, model_forward

__all__ = ["LeanTrainer", "DenseTrainer", "tree_bytes"]


def tree_bytes(tree: Any) -> int:
  """The bytes of a pytree's array leaves (shape x itemsize; no allocator overhead).

  >>> import numpy as np
  >>> tree_bytes({'a': np.zeros((2, 3), np.float32), 'b': np.zeros(4, np.int8), 'c': None})
  28
  """
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


class LeanTrainer:
  """SpaRTA and head-only training: the lean step over a mask.

  Args:
    graphdef: the model's graph definition from ``nnx.split(model, nnx.Param, ...)``.
    tx: the Optax transformation; it runs on the compact delta values.
    task: ``'classification'`` or ``'sft'`` (which loss, see :mod:`spra.recipes.losses`).
    call: how a module is called on a batch (default: the library's models'
      ``module(input_ids, attention_mask=...)``).
    sharded: the parameters are laid out on a mesh: use
      :func:`spra.sharding.sharded_lean_step`, whose state keeps the
      parameters' shardings step after step.
    microbatches: gradient accumulation: each step's batch runs as this many
      microbatches whose compact gradients are summed (:mod:`spra.microbatch`).
    masters: for weights narrower than float32, write the trained entries as
      ``round(base + delta)`` (see :func:`spra.lean_step`).
    backward: how sparse weight gradients are computed (``'auto'``,
      ``'sampled'``, ``'dense'`` or a :class:`spra.sparse_backward.Backward`;
      see :func:`spra.lean_step`).

  Attributes:
    loss_fn: ``loss_fn(params, frozen, batch)``, e.g. for
      :func:`spra.masks.fisher_scores` (batches as ``(frozen, batch)`` pairs).
    forward: ``forward(params, frozen, batch) -> logits``.
  """

  def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, task: str,
               call: Callable = call_model, sharded: bool = False, microbatches: int = 1, masters: bool = True,
               backward: Any = None):
    self.forward = model_forward(graphdef, call)
    self.loss_fn = loss_for(task, self.forward)
    self.tx = tx
    self.microbatches = microbatch.check_microbatches(microbatches)
    # The step's positional arguments are (frozen, batch): only the batch splits into microbatches.
    options = dict(microbatches=self.microbatches, split_args=(1,), masters=masters, backward=backward)
    self._lean = (sharding.sharded_lean_step if sharded else lean_step)(self.loss_fn, tx, **options)
    self._predict = jax.jit(self.forward)

  def init(self, params: Any, mask: Any) -> LeanState:
    """The state of a new run from the base ``params`` (donated to the first step: pass a copy to keep them)."""
    return self._lean.init(params, mask)

  def step(self, state: LeanState, frozen: Any, batch: Mapping[str, Any]) -> tuple[LeanState, jax.Array]:
    """One training step: ``(state, loss)``; ``state`` is donated."""
    return self._lean(state, frozen, batch)

  def finish(self, state: LeanState) -> LeanState:
    """Writes the pending update, so ``state.params`` is base + delta (training can go on from the result)."""
    return self._lean.flush(state)

  def predict(self, state: LeanState, frozen: Any, batch: Mapping[str, Any]) -> jax.Array:
    """Logits of the model with ``state``'s weights (call :meth:`finish` first)."""
    return self._predict(state.params, frozen, batch)

  def trained_variables(self, state: LeanState) -> Any:
    """The variables to write back into the model: every weight (base + delta)."""
    return state.params

  def trainable(self, state: LeanState) -> int:
    """Scalars that receive updates."""
    return num_trainable(state.delta.mask)

  def opt_state_bytes(self, state: LeanState) -> int:
    """The compact optimizer state plus the indices that say where it belongs (the mask is the method's state),
    and, for weights narrower than float32, the base values kept at the mask's entries (``LeanState.base``)."""
    return tree_bytes(state.opt_state) + tree_bytes(state.delta.mask) + tree_bytes(state.base)


class DenseTrainer:
  """LoRA and full fine-tuning: gradients of a dense set of variables, the optimizer on them.

  Args:
    graphdef: the graph definition from ``nnx.split(model, trainable_filter, ...)``.
    tx: the Optax transformation.
    task: ``'classification'`` or ``'sft'``.
    call: how a module is called on a batch.
    microbatches: gradient accumulation: each step's batch runs as this many
      microbatches whose gradients are summed before one optimizer update.

  The state is ``(trainable, opt_state)``; each step donates it.

  Example (full fine-tuning of a small classifier):

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> graphdef, params, rest = nnx.split(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    >>> trainer = DenseTrainer(graphdef, optax.adam(1e-2), task="classification", call=lambda m, b: m(b["x"]))
    >>> state = trainer.init(params)
    >>> state, loss = trainer.step(state, rest, {"x": jnp.ones((8, 4)), "labels": jnp.zeros(8, jnp.int32)})
    >>> trainer.trainable(state), trainer.opt_state_bytes(state) > 2 * 4 * 10
    (10, True)
  """

  def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, task: str,
               call: Callable = call_model, microbatches: int = 1):
    self.forward = model_forward(graphdef, call)
    self.loss_fn = loss_for(task, self.forward)
    self.tx = tx
    self.microbatches = microbatch.check_microbatches(microbatches)

    def step(state, frozen, batch):
      trainable, opt_state = state
      value, grads = microbatch.accumulate(jax.value_and_grad(self.loss_fn), self.microbatches,
                                           (trainable, frozen, batch), split=(2,))
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), value

    self._step = jax.jit(step, donate_argnums=0)
    self._predict = jax.jit(self.forward)

  def init(self, trainable: Any) -> tuple[Any, Any]:
    """The state of a new run: the trainable variables (donated to the first step) and the optimizer's state."""
    return (trainable, self.tx.init(trainable))

  def step(self, state: tuple[Any, Any], frozen: Any, batch: Mapping[str, Any]) -> tuple[tuple[Any, Any], jax.Array]:
    """One training step: ``(state, loss)``; ``state`` is donated."""
    return self._step(state, frozen, batch)

  def finish(self, state: tuple[Any, Any]) -> tuple[Any, Any]:
    """Nothing is pending in a dense step: the state as it is."""
    return state

  def predict(self, state: tuple[Any, Any], frozen: Any, batch: Mapping[str, Any]) -> jax.Array:
    """Logits of the model with ``state``'s trained variables."""
    return self._predict(state[0], frozen, batch)

  def trained_variables(self, state: tuple[Any, Any]) -> Any:
    """The trained variables (LoRA factors and the head, or every weight)."""
    return state[0]

  def trainable(self, state: tuple[Any, Any]) -> int:
    """Scalars that receive updates."""
    return int(sum(x.size for x in jax.tree.leaves(state[0])))

  def opt_state_bytes(self, state: tuple[Any, Any]) -> int:
    """The optimizer's state (e.g. AdamW's two moments of every trained scalar)."""
    return tree_bytes(state[1])
