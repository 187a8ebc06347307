"""Exact-k choice: a uniformly random k-subset of ``range(n)``, as sorted unique int32 indices, in memory O(k).

Private to :mod:`spra_jax.masks`; the samplers place their entries with it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _expected_duplicates(n: int, t: int) -> float:
  """Expected number of repeats among t uniform draws from n values."""
  distinct = n * -math.expm1(t * math.log1p(-1.0 / n)) if n > 1 else 1.0
  return max(t - distinct, 0.0)


def _oversample_margin(n: int, k: int) -> int:
  m = 0
  for _ in range(3):  # A fixed point: more draws bring a few more repeats.
    e = _expected_duplicates(n, k + m)
    m = math.ceil(e + 6.0 * math.sqrt(e) + 8)
  return m


def _choose_sorted(key: jax.Array, n: int, k: int) -> jax.Array:
  """A uniformly random k-subset of range(n), sorted, as int32 (k static)."""
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  if k == n:
    return jnp.arange(n, dtype=jnp.int32)
  return _choose_padded(key, n, k, k)


def _capacity_bucket(k: int, n: int) -> int:
  """Rounds k up on a 5 % geometric grid, so random counts share compilations."""
  if k <= 64:
    return min(64, n)
  return min(n, math.ceil(1.05 ** math.ceil(math.log(k, 1.05))))


def _choose_dynamic(key: jax.Array, n: int, k: int) -> jax.Array:
  """Like :func:`_choose_sorted` for a concrete k that varies between calls."""
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  if k == n:
    return jnp.arange(n, dtype=jnp.int32)
  padded = _choose_padded(key, n, _capacity_bucket(k, n), jnp.int32(k))
  # Slice on the host: an eager device slice would compile once per distinct k.
  return jnp.asarray(np.asarray(padded)[:k])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _choose_padded(key: jax.Array, n: int, capacity: int, k: jax.Array) -> jax.Array:
  """A uniformly random k-subset of range(n) for 1 ≤ k ≤ capacity < n.

  Returns int32[capacity] whose first k entries are the subset, sorted (the
  rest is padding). k may be traced; the shapes depend on ``capacity`` only.

  Sparse regime (capacity ≤ n/4): draw t = capacity + m values with
  replacement, sort them, and keep the k distinct values with the smallest
  random priorities (repeats never qualify). Priorities are independent of the
  values, so the k kept are a uniform k-subset of the distinct values, and the
  whole procedure treats every value of range(n) alike: the result is a uniform
  k-subset of range(n). m is chosen so that enough distinct values come up
  except with odds of a 6-sigma event; if they do not, the draw is repeated, so
  the count is always exactly k. The cost is two plain sorts of t values (XLA's
  sorts that carry a payload are several times slower): memory and time are
  O(k log k), independent of n.

  Dense regime (capacity > n/4): a random permutation's first k entries, O(n),
  which is O(k) there.
  """
  if 4 * capacity > n:
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return jnp.sort(jnp.where(jnp.arange(n) < k, perm, n))[:capacity]

  t = capacity + _oversample_margin(n, capacity)
  never = jnp.uint32(0xFFFFFFFF)

  def attempt(i):
    draw_key, priority_key = jax.random.split(jax.random.fold_in(key, i))
    values = jnp.sort(jax.random.randint(draw_key, (t,), 0, n, dtype=jnp.int32))
    repeat = jnp.concatenate([jnp.zeros((1,), bool), values[1:] == values[:-1]])
    enough = (t - jnp.sum(repeat)) >= k
    priority = jnp.where(repeat, never, jax.random.bits(priority_key, (t,), jnp.uint32) >> 1)
    threshold = jnp.sort(priority)[k - 1]
    # Exactly k: every priority below the threshold, then ties at it in order
    # (a tie has odds of about t / 2**31 per leaf).
    below = priority < threshold
    at = priority == threshold
    keep = below | (at & (jnp.cumsum(at) <= k - jnp.sum(below)))
    slot = jnp.where(keep, jnp.cumsum(keep) - 1, capacity)
    return jnp.full((capacity,), n, jnp.int32).at[slot].set(values, mode="drop"), enough

  def body(carry):
    i, _, _ = carry
    out, ok = attempt(i + 1)
    return i + 1, out, ok

  # Attempts 0, 1, ... until one has enough distinct values. The first attempt runs inside the loop too: one copy
  # of its program instead of two halves the compile time (about 0.6 s instead of 1 s on a CPU), the values are the
  # same.
  start = (jnp.int32(-1), jnp.full((capacity,), n, jnp.int32), jnp.bool_(False))
  _, out, _ = jax.lax.while_loop(lambda c: ~c[2], body, start)
  return out
