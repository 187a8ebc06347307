"""Distributions: the :class:`Distribution` base, the registry of distributions by name, and the random samplers.

A distribution is an allocation rule (a global density to a budget per leaf) plus a sampler that places one leaf's
budget (:meth:`Distribution.sample`). A new distribution is one subclass, registered by name with :func:`register`.
"""

from __future__ import annotations

import abc
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

from spra_jax.masks._allocation import Allocation, _allocate, _check_density, _round_half_up
from spra_jax.masks._choice import _choose_dynamic, _choose_sorted

__all__ = [
    "Bernoulli",
    "Distribution",
    "Uniform",
    "available",
    "bernoulli",
    "get",
    "register",
    "resolve_distribution",
    "uniform",
]


class Distribution(abc.ABC):
  """How trainable entries are chosen: a budget rule and a placement rule.

  Args:
    density: the fraction of entries to train, in (0, 1].
    allocation: how the global budget is split across leaves:
      ``'proportional'`` (the default: every eligible leaf at ``density``),
      ``'equal'`` (the same count per leaf, capped at the leaf size), a mapping
      ``{path regex: density}`` (per-leaf densities; unmatched leaves use
      ``density``) or a callable ``(paths, sizes, total) -> budgets``.
    relative_to: ``'eligible'`` (the default) counts ``density`` against the
      entries of the eligible leaves. ``'model'`` counts it against every
      floating entry of the model, as the SpaRTA paper does ("99 % sparsity" =
      1 % of all parameters). Fully trainable leaves are then charged against the
      budget, and the rest is placed in the eligible leaves.

  A new distribution is one subclass with a ``name`` and a :meth:`sample`
  method, registered with :func:`register`:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> @register
    ... class FirstEntries(Distribution):
    ...   name = 'first-entries'
    ...   def sample(self, key, path, shape, budget):
    ...     return jnp.arange(budget, dtype=jnp.int32)
    >>> mask = sample_mask(jax.random.key(0), {'w': jnp.zeros((10, 10))},
    ...                    get('first-entries', 0.05))
    >>> mask['w'].indices.tolist()
    [0, 1, 2, 3, 4]
  """

  name: ClassVar[str] = ""
  #: True when :meth:`sample` returns exactly ``budget`` indices.
  exact: ClassVar[bool] = True

  def __init__(self, density: float, *, allocation: Allocation = "proportional", relative_to: str = "eligible"):
    self.density = _check_density(density)
    if relative_to not in ("eligible", "model"):
      raise ValueError(f"relative_to must be 'eligible' or 'model', got {relative_to!r}.")
    if relative_to == "model" and not (isinstance(allocation, str) or callable(allocation)):
      raise ValueError("relative_to='model' needs a global budget; a per-leaf density map cannot be used with it.")
    self.allocation = allocation
    self.relative_to = relative_to

  @abc.abstractmethod
  def sample(self, key: jax.Array, path: str, shape: tuple[int, ...], budget: int) -> jax.Array:
    """Returns sorted, unique int32 flat indices into a leaf of ``shape``.

    Args:
      key: this leaf's key (already folded with the path).
      path: the leaf's '/'-joined path.
      shape: the leaf's shape.
      budget: how many entries to choose (the expected number if not ``exact``).
    """

  def min_budget(self, shape: tuple[int, ...], minimum: int) -> int:
    """The smallest budget for which :meth:`sample` places at least ``minimum`` entries of a leaf of ``shape``.

    :func:`~spra_jax.masks.sample_mask` raises a leaf's budget to it for ``min_per_leaf``. The default,
    ``minimum``, is right for distributions that place about ``budget`` entries; one that rounds to whole lines
    (rows, columns, tiles) returns the budget of enough whole lines. A draw that still comes out short (a random
    count) is topped up by :func:`~spra_jax.masks.sample_mask` with uniformly chosen entries.

    Args:
      shape: the leaf's shape.
      minimum: the entries the leaf must train, at most its size.

    Example:

      >>> uniform(0.01).min_budget((64, 64), 1)
      1
    """
    return int(minimum)

  def budgets(self, paths: Sequence[str], sizes: Sequence[int], *, model_entries: int, full_entries: int) -> list[int]:
    """Per-leaf budgets for the eligible leaves ``paths`` of ``sizes``."""
    eligible = sum(sizes)
    density = self.density
    if self.relative_to == "model":
      total = _round_half_up(self.density * model_entries) - full_entries
      if total < 0:
        raise ValueError(
            f"density {self.density} of the model's {model_entries:,} entries gives a budget of "
            f"{_round_half_up(self.density * model_entries):,}, smaller than the {full_entries:,} "
            "entries of the fully trainable leaves it must include."
        )
      if total > eligible:
        raise ValueError(
            f"density {self.density} of the model's {model_entries:,} entries leaves a budget of "
            f"{total:,} for the eligible leaves, which hold only {eligible:,} entries "
            f"(at most density {(eligible + full_entries) / model_entries:.6g} relative to the model)."
        )
      density = total / eligible if eligible else 0.0
    return _allocate(self.allocation, paths, sizes, density)

  def spec(self) -> dict[str, Any]:
    """A JSON-able description, kept as provenance next to saved masks."""
    alloc = self.allocation
    if isinstance(alloc, Mapping):
      alloc = dict(alloc)
    elif callable(alloc):
      alloc = getattr(alloc, "__name__", repr(alloc))
    return {"name": self.name, "density": self.density, "allocation": alloc, "relative_to": self.relative_to}

  def __repr__(self) -> str:
    extra = "" if self.allocation == "proportional" else f", allocation={self.allocation!r}"
    extra += "" if self.relative_to == "eligible" else f", relative_to={self.relative_to!r}"
    return f"{type(self).__name__}({self.density}{extra})"


_REGISTRY: dict[str, type[Distribution]] = {}


def register(cls: type[Distribution]) -> type[Distribution]:
  """Class decorator that makes a :class:`Distribution` selectable by name."""
  if not (isinstance(cls, type) and issubclass(cls, Distribution)) or not cls.name:
    raise TypeError("register expects a Distribution subclass with a non-empty `name`.")
  _REGISTRY[cls.name] = cls
  return cls


def available() -> list[str]:
  """Names of the registered distributions.

  Example:

    >>> 'uniform' in available() and 'bernoulli' in available()
    True
  """
  return sorted(_REGISTRY)


def get(name: str, density: float, **kwargs: Any) -> Distribution:
  """Builds a registered distribution by name.

  Raises:
    ValueError: ``name`` is not registered; the message lists :func:`available` and a close match, if any.

  Example:

    >>> get('bernoulli', 0.01)
    Bernoulli(0.01)
  """
  return _lookup(name)(density, **kwargs)


# Distributions that need data besides a density, so they have no registered name; a user who asks for them by
# name is pointed to their constructor.
_UNNAMED = {"top-k": "top_k(density, scores)", "top_k": "top_k(density, scores)", "topk": "top_k(density, scores)",
            "magnitude": "magnitude(density, params)", "fisher": "top_k(density, fisher_scores(loss_fn, params, batches))"}


def _lookup(name: str) -> type[Distribution]:
  """The registered class of ``name``, or a ValueError that lists the names and suggests the closest one."""
  if not isinstance(name, str):
    raise TypeError(f"a distribution name must be a str, got {type(name).__name__}.")
  if name in _REGISTRY:
    return _REGISTRY[name]
  names = available()
  close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  if name.lower() in _UNNAMED:
    hint = f" (it needs data besides a density: pass spra.masks.{_UNNAMED[name.lower()]})"
  raise ValueError(f"unknown mask distribution {name!r}{hint}; available: {', '.join(names)}.")


def resolve_distribution(distribution: Distribution | str | None, density: float | None) -> Distribution:
  """Turns the ``distribution``/``density`` arguments of the public API into an object.

  A name is looked up before the density is asked for, so a misspelt name is reported as unknown.
  """
  if isinstance(distribution, Distribution):
    if density is not None and float(density) != distribution.density:
      raise ValueError(
          f"density={density} conflicts with the distribution's own density {distribution.density}; "
          "give one of them."
      )
    return distribution
  if distribution is not None and not isinstance(distribution, str):
    raise TypeError(f"distribution must be a Distribution or a registered name, got {type(distribution).__name__}.")
  cls = Uniform if distribution is None else _lookup(distribution)
  if density is None and distribution is None:
    raise ValueError("a density is needed: pass density=... or a Distribution such as spra.masks.uniform(0.01).")
  if density is None:
    raise ValueError(f"a density is needed with distribution={distribution!r}: pass density=..., e.g. density=0.01.")
  return cls(density)


@register
class Uniform(Distribution):
  """Exactly ``budget`` entries per leaf, uniformly without replacement."""

  name = "uniform"

  def sample(self, key, path, shape, budget):
    return _choose_sorted(key, math.prod(shape), int(budget))


@register
class Bernoulli(Distribution):
  """Each entry independently with probability ``budget / size``.

  This is the reference SpaRTA code's rule. The count per leaf is random, so
  masks must be sampled outside ``jax.jit`` (the count decides the shapes).
  """

  name = "bernoulli"
  exact = False

  def sample(self, key, path, shape, budget):
    n = math.prod(shape)
    count_key, place_key = jax.random.split(key)
    p = float(budget) / n if n else 0.0
    if p >= 1.0:
      count = n
    else:
      # Given its count, a Bernoulli subset is a uniform subset of that size.
      count = _concrete_count(jax.random.binomial(count_key, float(n), p), "bernoulli")
    return _choose_dynamic(place_key, n, count)


def _concrete_count(value: Any, what: str) -> int:
  try:
    with jax.ensure_compile_time_eval():
      return int(value)
  except jax.errors.ConcretizationTypeError as e:
    raise ValueError(
        f"{what} draws a random number of entries per leaf, which needs a concrete "
        "key: call spra.sample_mask outside jax.jit and pass the mask in."
    ) from e


def uniform(density: float, **kwargs: Any) -> Uniform:
  """Exactly k = round(density · size) entries per leaf, without replacement.

  See :class:`Distribution` for ``allocation`` and ``relative_to``.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 100))}, uniform(0.01))
    >>> m['w'].num_trainable
    100
  """
  return Uniform(density, **kwargs)


def bernoulli(density: float, **kwargs: Any) -> Bernoulli:
  """Each entry independently with probability ``density`` (the paper's code).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 100))}, bernoulli(0.01))
    >>> 60 < m['w'].num_trainable < 140
    True
  """
  return Bernoulli(density, **kwargs)
