"""Gradient accumulation over microbatches, inside one compiled step.

A step over a batch of B rows can run as ``n`` microbatches of B / n rows:
the gradients (compact ones, on the lean path) are summed in a loop and
averaged, so the activations of only B / n rows are alive at a time while the
optimizer sees the gradient of the whole batch. For a loss that is a mean
over equally many rows per microbatch (classification), the result equals the
full batch's up to float rounding; a loss averaged over a varying number of
tokens (SFT) becomes the mean of the microbatches' means.

Microbatch ``j`` takes rows ``j, j + n, j + 2n, ...``: on a batch sharded
over devices along its rows, every device keeps its share of every
microbatch, so no device idles and no rows move between devices.

  >>> import jax, jax.numpy as jnp
  >>> loss = lambda w, x: ((x @ w) ** 2).mean()
  >>> w, x = jnp.ones(3), jnp.arange(12.).reshape(4, 3)
  >>> full = jax.value_and_grad(loss)(w, x)
  >>> acc = accumulate(jax.value_and_grad(loss), 2, (w, x), split=(1,))
  >>> bool(jnp.allclose(full[0], acc[0])), bool(jnp.allclose(full[1], acc[1]))
  (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_microbatches", "microbatch", "accumulate"]


def check_microbatches(n: Any) -> int:
  """``n`` as a positive int, or a ValueError that names it.

  >>> check_microbatches(4)
  4
  >>> check_microbatches(0)
  Traceback (most recent call last):
  ...
  ValueError: the number of microbatches (gradient accumulation steps) must be an int >= 1, got 0
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"the number of microbatches (gradient accumulation steps) must be an int >= 1, got {n!r}")
  return int(n)


def _rows(tree: Any) -> set[int]:
  return {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(tree)}


def microbatch(tree: Any, n: int, j: Any) -> Any:
  """Microbatch ``j`` of ``n`` of a batch tree: rows ``j, j + n, ...`` of every leaf (``j`` may be traced).

  >>> import jax.numpy as jnp
  >>> microbatch({'x': jnp.arange(6)}, 3, 1)['x'].tolist()
  [1, 4]
  """
  def one(x):
    x = jnp.asarray(x)
    strided = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(strided, j, axis=1, keepdims=False)
  return jax.tree.map(one, tree)


def accumulate(value_and_grad_fn: Callable, n: int, args: Sequence[Any], *, split: Sequence[int] | None = None,
               has_aux: bool = False) -> Any:
  """``value_and_grad_fn(*args)`` over ``n`` microbatches: the mean value and the mean gradient.

  Args:
    value_and_grad_fn: returns ``(value, grads)``, or ``((value, aux), grads)``
      with ``has_aux`` (as ``jax.value_and_grad`` does).
    n: the number of microbatches; every split argument's leaves need a
      leading dimension divisible by ``n``.
    args: the positional arguments.
    split: which of ``args`` are batches to split (default: all).
    has_aux: the function returns an ``aux``; the result's aux is then stacked
      over the microbatches (a leading dimension of size ``n``).

  Raises:
    ValueError: if a split argument's rows are not divisible by ``n``.

  Example (the frozen weights, argument 0, are not split; the batch is):

    >>> import jax, jax.numpy as jnp
    >>> loss = lambda w, x: (x @ w).mean()
    >>> value, grad = accumulate(jax.value_and_grad(loss), 4, (jnp.ones(2), jnp.ones((8, 2))), split=(1,))
    >>> float(value), grad.tolist()
    (2.0, [1.0, 1.0])
  """
  n = check_microbatches(n)
  if n == 1:
    return value_and_grad_fn(*args)
  split = tuple(range(len(args))) if split is None else tuple(split)
  for i in split:
    rows = _rows(args[i])
    if -1 in rows or any(r % n for r in rows):
      raise ValueError(f"{n} microbatches need batch arrays whose leading dimension is divisible by {n}; "
                       f"argument {i} has leading dimensions {sorted(rows)}")

  def args_for(j):
    return [microbatch(a, n, j) if i in split else a for i, a in enumerate(args)]

  # The first microbatch outside the loop gives the carry its structure and dtypes.
  first = value_and_grad_fn(*args_for(0))
  (value, aux), grads = (first[0], first[1]) if has_aux else ((first[0], None), first[1])
  auxes = None if aux is None else jax.tree.map(lambda a: jnp.zeros((n, *jnp.shape(a)), jnp.result_type(a)).at[0].set(a), aux)

  def body(j, carry):
    value_sum, grad_sum, auxes = carry
    out, g = value_and_grad_fn(*args_for(j))
    v, a = out if has_aux else (out, None)
    if auxes is not None:
      auxes = jax.tree.map(lambda s, x: s.at[j].set(x), auxes, a)
    return value_sum + v, jax.tree.map(jnp.add, grad_sum, g), auxes

  value_sum, grad_sum, auxes = jax.lax.fori_loop(1, n, body, (value, grads, auxes))
  mean = lambda x: (x / n).astype(jnp.result_type(x))
  value, grads = mean(value_sum), jax.tree.map(mean, grad_sum)
  return ((value, auxes), grads) if has_aux else (value, grads)
