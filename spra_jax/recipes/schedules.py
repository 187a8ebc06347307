"""The optimizer every recipe uses: AdamW with a linear warm-up and a cosine decay to zero.

  >>> import jax.numpy as jnp
  >>> schedule = warmup_cosine(1e-2, total_steps=100, warmup_ratio=0.1)
  >>> [round(float(schedule(s)), 5) for s in (0, 5, 10, 100)]
  [0.0, 0.005, 0.01, 0.0]

With ``tunable=True`` the peak rate lives in the optimizer state instead of the
compiled step, so one compilation serves every learning rate of a sweep:

  >>> tx = adamw(1.0, total_steps=10, tunable=True)
  >>> state = set_learning_rate(tx.init({'w': jnp.zeros(3)}), 3e-4)
  >>> round(float(optax.tree_utils.tree_get(state, 'learning_rate')), 8)
  0.0003
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

__all__ = ["warmup_cosine", "adamw", "set_learning_rate"]


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float = 0.06) -> optax.Schedule:
  """Linear warm-up from 0 over ``int(warmup_ratio * total_steps)`` steps, then cosine decay to 0 at ``total_steps``.

  With no warm-up step (a short run or ``warmup_ratio=0``) it starts at ``peak``.
  """
  warmup = int(warmup_ratio * total_steps)
  if not warmup:
    return optax.cosine_decay_schedule(peak, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)


def adamw(learning_rate: float, total_steps: int, *, warmup_ratio: float = 0.06, weight_decay: float = 0.0,
          tunable: bool = False) -> optax.GradientTransformation:
  """AdamW at ``learning_rate`` on the :func:`warmup_cosine` schedule.

  Args:
    learning_rate: the peak rate.
    total_steps: the run's length (the schedule reaches 0 there).
    warmup_ratio: the fraction of ``total_steps`` spent warming up.
    weight_decay: AdamW's decoupled weight decay.
    tunable: keep the peak rate in the optimizer state
      (``optax.inject_hyperparams``) and the schedule's shape outside it, so
      :func:`set_learning_rate` changes the rate of an initialised state
      without recompiling the step. The updates are the same as without.
  """
  if not tunable:
    return optax.adamw(warmup_cosine(learning_rate, total_steps, warmup_ratio), weight_decay=weight_decay)
  unit = warmup_cosine(1.0, total_steps, warmup_ratio)
  return optax.chain(optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, weight_decay=weight_decay),
                     optax.scale_by_schedule(unit))


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
  """``opt_state`` of a ``tunable`` :func:`adamw` (anywhere inside it, e.g. in a lean step's state) at a new peak rate."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32))
