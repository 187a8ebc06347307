"""Allocation rules: how a global density becomes a budget per eligible leaf.

Private to :mod:`spra_jax.masks`. A distribution's ``allocation`` argument picks the rule (``'proportional'``,
``'equal'``, a ``{path regex: density}`` map or a callable); :meth:`Distribution.budgets` applies it, which is why
the rules sit below the distributions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Allocation = str | Mapping[str, float] | Callable[[Sequence[str], Sequence[int], int], Sequence[int]]


def _round_half_up(x: float) -> int:
  return math.floor(x + 0.5)


def _allocate(rule: Allocation, paths: Sequence[str], sizes: Sequence[int], density: float) -> list[int]:
  """Budgets per eligible leaf for a global ``density``."""
  if isinstance(rule, str) and rule == "proportional":
    # Each leaf's budget depends on its own size only, so adding or removing
    # other leaves never changes it (the total is within ±len/2 of density·N).
    return [_round_half_up(density * n) for n in sizes]
  if isinstance(rule, str) and rule == "equal":
    total = _round_half_up(density * sum(sizes))
    return _water_fill(sizes, total)
  if isinstance(rule, Mapping):
    compiled = [(_compile_key(p), float(d)) for p, d in rule.items()]
    for p, d in compiled:
      _check_density(d, f"allocation[{p.pattern!r}]")
    out = []
    for path, n in zip(paths, sizes):
      d = next((d for p, d in compiled if p.search(path)), density)
      out.append(_round_half_up(d * n))
    return out
  if callable(rule):
    total = _round_half_up(density * sum(sizes))
    budgets = [int(b) for b in rule(list(paths), list(sizes), total)]
    if len(budgets) != len(sizes):
      raise ValueError(
          f"allocation rule returned {len(budgets)} budgets for {len(sizes)} eligible leaves."
      )
    for path, n, b in zip(paths, sizes, budgets):
      if not 0 <= b <= n:
        raise ValueError(f"allocation rule gave leaf {path!r} a budget of {b}; expected 0 ≤ budget ≤ {n}.")
    return budgets
  raise ValueError(
      "allocation must be 'proportional', 'equal', a mapping {path regex: density} "
      f"or a callable (paths, sizes, total) -> budgets; got {rule!r}."
  )


def _compile_key(pattern: Any) -> re.Pattern:
  """One path regex of an allocation map, or a ValueError that names it."""
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"allocation key {pattern!r} is not a valid path regular expression: {e}") from None


def _water_fill(sizes: Sequence[int], total: int) -> list[int]:
  """Splits ``total`` as equally as possible, never above a leaf's size."""
  budgets = [0] * len(sizes)
  open_leaves = sorted(range(len(sizes)), key=lambda i: sizes[i])
  remaining = total
  while open_leaves:
    share = remaining // len(open_leaves)
    i = open_leaves[0]
    if sizes[i] <= share:  # The smallest leaf saturates; share its excess.
      budgets[i] = sizes[i]
      remaining -= sizes[i]
      open_leaves.pop(0)
      continue
    extra = remaining - share * len(open_leaves)
    for rank, j in enumerate(open_leaves):
      budgets[j] = share + (1 if rank >= len(open_leaves) - extra else 0)
    break
  return budgets


def _check_density(density: Any, name: str = "density") -> float:
  if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
    raise TypeError(f"{name} must be a number in (0, 1], got {density!r}.")
  d = float(density)
  if not 0.0 < d <= 1.0 or math.isnan(d):
    raise ValueError(f"{name} must be in (0, 1], got {density!r}.")
  return d
