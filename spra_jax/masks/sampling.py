"""Sampling a mask over a parameter pytree: which leaves train (:func:`leaf_roles`), the key each leaf draws from
(:func:`leaf_key`), and :func:`sample_mask`, which places each eligible leaf's budget, shard-locally when the leaf is
sharded.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spra_jax.masks._choice import _choose_sorted
from spra_jax.masks.distributions import Distribution, resolve_distribution
from spra_jax.masks.layout import block_budget, block_grid, compact_sharding, leaf_sharding
from spra_jax.masks.leaf import (
    _MAX_LEAF_SIZE,
    FROZEN,
    FULL,
    SPARSE,
    LeafMask,
    _example_paths,
    _is_trainable_dtype,
    _shape_dtype,
    path_str,
)

__all__ = ["check_min_per_leaf", "leaf_key", "leaf_roles", "sample_mask"]


Pattern = str | Sequence[str] | re.Pattern | None


def _compile(pattern: Pattern, name: str) -> re.Pattern | None:
  if pattern is None:
    return None
  if isinstance(pattern, re.Pattern):
    return pattern
  if isinstance(pattern, str):
    return _compile_one(pattern, name)
  if isinstance(pattern, Sequence) and all(isinstance(p, str) for p in pattern):
    for i, p in enumerate(pattern):  # Each on its own first, so that an error names the bad one.
      _compile_one(p, f"{name}[{i}]")
    return _compile_one("|".join(f"(?:{p})" for p in pattern), name)
  raise TypeError(f"{name} must be a regex string, a list of them or None; got {pattern!r}.")


def _compile_one(pattern: str, name: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {e}") from None


def _stable_hash(path: str) -> np.uint32:
  # Python's hash() is salted per process; blake2b is the same everywhere.
  digest = hashlib.blake2b(path.encode("utf-8"), digest_size=4).digest()
  return np.uint32(int.from_bytes(digest, "little"))


# The int seeds jax.random.key takes: a C long. Without jax_enable_x64 only the low 32 bits of a seed reach the key.
_SEED_RANGE = "-2**63 <= seed < 2**63"


def _as_key(key: Any) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    try:
      return jax.random.key(int(key))
    except OverflowError:
      raise ValueError(
          f"key={int(key)} is out of range for an int seed: jax.random.key takes {_SEED_RANGE} (and without "
          "jax_enable_x64 only the low 32 bits count, so seeds 0 <= seed < 2**32 give distinct masks); "
          "pass such a seed or a PRNG key, e.g. jax.random.key(0)."
      ) from None
  if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    # A legacy uint32[2] key.
    if key.shape != (2,) or key.dtype != jnp.uint32:
      raise TypeError(
          "key must be a typed PRNG key (jax.random.key), a legacy uint32[2] key "
          f"(jax.random.PRNGKey) or an int seed; got an array of {key.dtype}{list(key.shape)}."
      )
    return jax.random.wrap_key_data(key)
  if isinstance(key, jax.Array):
    if key.shape != ():
      raise TypeError(f"key must be a single PRNG key, got a batch of shape {key.shape}.")
    return key
  raise TypeError(
      "key must be a PRNG key (jax.random.key(seed)) or an int seed; "
      f"got {type(key).__name__}."
  )


def leaf_key(key: Any, path: str) -> jax.Array:
  """The key a leaf's mask is drawn from: ``fold_in(key, stable_hash(path))``.

  Example:

    >>> import jax
    >>> k = leaf_key(jax.random.key(0), 'layers/0/kernel')
    >>> k.shape
    ()
  """
  return jax.random.fold_in(_as_key(key), _stable_hash(path))


def leaf_roles(params: Any, *, include: Pattern = None, exclude: Pattern = None,
               full: Pattern = None) -> dict[str, str]:
  """The role :func:`sample_mask` gives each leaf: ``SPARSE``, ``FULL`` or ``FROZEN``, by '/'-joined path.

  A floating-point leaf is ``FULL`` when ``full`` matches its path, else
  ``SPARSE`` when ``include`` matches (or is None) and ``exclude`` does not;
  everything else is ``FROZEN``. Use it to size a budget before sampling, e.g.
  the eligible entries a preset exposes.

  Raises:
    ValueError: ``params`` has no leaves, or a pattern matches no leaf.

  Example:

    >>> import jax.numpy as jnp
    >>> params = {'attn': {'v': jnp.zeros((4, 4)), 'q': jnp.zeros((4, 4))}, 'head': jnp.zeros(3),
    ...           'ids': jnp.arange(2)}
    >>> leaf_roles(params, include='attn/v', full='head')
    {'attn/q': 'frozen', 'attn/v': 'sparse', 'head': 'full', 'ids': 'frozen'}
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [path_str(p) for p, _ in flat]
  return dict(zip(paths, _roles(paths, [_shape_dtype(leaf)[1] for _, leaf in flat], include, exclude, full)))


def _roles(paths: Sequence[str], dtypes: Sequence[np.dtype], include: Pattern, exclude: Pattern,
           full: Pattern) -> list[str]:
  """:func:`leaf_roles` as a list in leaf order (what :func:`sample_mask` uses)."""
  include_re = _compile(include, "include")
  exclude_re = _compile(exclude, "exclude")
  full_re = _compile(full, "full")
  if not paths:
    raise ValueError("params has no leaves; nothing to mask.")
  for pattern, name in ((include_re, "include"), (exclude_re, "exclude"), (full_re, "full")):
    if pattern is not None and not any(pattern.search(p) for p in paths):
      raise ValueError(f"{name}={pattern.pattern!r} matches no leaf; leaf paths look like {_example_paths(paths)}.")
  roles = []
  for path, dtype in zip(paths, dtypes):
    if not _is_trainable_dtype(dtype):
      roles.append(FROZEN)
    elif full_re is not None and full_re.search(path):
      roles.append(FULL)
    elif (include_re is None or include_re.search(path)) and not (exclude_re is not None and exclude_re.search(path)):
      roles.append(SPARSE)
    else:
      roles.append(FROZEN)
  return roles


def sample_mask(
    key: Any,
    params: Any,
    distribution: Distribution | str | None = None,
    *,
    density: float | None = None,
    include: Pattern = None,
    exclude: Pattern = None,
    full: Pattern = None,
    shard_local: bool = True,
    min_per_leaf: int = 0,
) -> Any:
  """Samples a sparse random mask over a parameter pytree.

  Args:
    key: a PRNG key (``jax.random.key``) or an int seed (``-2**63 <= seed < 2**63``, as ``jax.random.key`` takes;
      without ``jax_enable_x64`` only its low 32 bits count).
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (no weights needed).
    distribution: a :class:`Distribution`, or a registered name together with
      ``density``; defaults to :func:`uniform`.
    density: the density, when ``distribution`` is a name or omitted.
    include: regex(es) searched in each leaf's '/'-joined path; only matching
      leaves are eligible for sparse training (default: every leaf).
    exclude: regex(es); matching leaves are never sparsified.
    full: regex(es); matching leaves train every entry (e.g. a classifier head).
      ``full`` wins over ``include``/``exclude``.
    shard_local: stratify each leaf that carries a sharding over several
      devices (a ``jax.Array`` or ``jax.ShapeDtypeStruct`` with a sharding that
      splits it into equal blocks) by its shard blocks; see below.
    min_per_leaf: every eligible leaf trains at least ``min(min_per_leaf, leaf size)`` entries; see below.

  Only floating-point leaves can train. Each eligible leaf draws from
  :func:`leaf_key` ``(key, path)``.

  Leaves that get no entry: a leaf whose budget rounds to 0 (e.g. a bias of 3
  entries at density 0.01), or whose random count comes out 0, is frozen (not a
  sparse leaf with no indices), and a ``UserWarning`` names it. Leaves with no
  entries at all are frozen silently.

  ``min_per_leaf``: after the distribution's allocation rule (any of them) has
  set the budgets, each eligible leaf's budget is raised to at least that of
  ``min(min_per_leaf, leaf size)`` entries (:meth:`Distribution.min_budget`).
  Leaves already there keep their budget and their mask (the same indices as
  without the minimum). The total can therefore exceed ``density`` times the
  eligible entries (with ``relative_to='model'``, the model's budget): each
  raised leaf adds up to its minimum. Structured distributions reach the
  minimum in whole lines (the fewest rows, columns or tiles that hold it), so
  ``min_per_leaf=1`` means one line. For ``bernoulli`` the budget is the
  expected count, so a raised leaf draws each entry with probability
  minimum / size, and a draw below the minimum is topped up with entries chosen
  uniformly from the rest of the leaf (the count is then ``max(draw, minimum)``
  and the entries a uniform subset of that size). A shard-local leaf of n
  blocks gets at least ``ceil(minimum / n)`` entries per block: at least one per
  block, and at least the minimum in total.

  Shard-local sampling: a leaf split into n blocks gets the same number of
  entries in every block, each block sampled by the distribution from
  ``fold_in(leaf_key(key, path), j)``. The leaf's budget k is rounded to the
  nearest multiple of n (at least n when k > 0, at most the leaf size), so that
  the compact ``[k]`` vector splits into n equal slices, slice j on the devices
  holding block j: the optimizer then needs no communication. Every entry keeps
  the marginal probability k / size (the blocks are equal). The mask records
  the grid in :attr:`LeafMask.blocks`; see :class:`LeafMask` for the order of
  its indices. Concrete sharded leaves get their indices placed with
  :func:`compact_sharding`. Needs an exact distribution (e.g. ``uniform``).
  Under ``jax.jit`` leaves carry no sharding, so sample outside of it.

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    :class:`LeafMask` nodes.

  Raises:
    ValueError: for a density outside (0, 1], an unknown distribution name, a
      pattern that is not a valid regex or matches no leaf, an empty selection,
      a budget larger than the eligible entries, an int ``key`` out of range or
      a negative ``min_per_leaf``.
    TypeError: for a ``min_per_leaf`` that is not an int.

  Warns:
    UserWarning: when an eligible leaf gets no entry and is frozen (see above).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import is_leaf_mask
    >>> params = {'attn': {'v_proj': {'kernel': jax.ShapeDtypeStruct((512, 512), jnp.float32)},
    ...                    'q_proj': {'kernel': jax.ShapeDtypeStruct((512, 512), jnp.float32)}},
    ...           'score': {'kernel': jax.ShapeDtypeStruct((512, 2), jnp.float32)}}
    >>> mask = sample_mask(jax.random.key(0), params, density=0.01,
    ...                    include=r'v_proj', full=r'score')
    >>> [m.num_trainable for m in jax.tree.leaves(mask, is_leaf=is_leaf_mask)]
    [0, 2621, 1024]

    A small leaf whose budget rounds to 0 trains with a minimum per leaf:

    >>> params = {'w': jax.ShapeDtypeStruct((64, 64), jnp.float32), 'b': jax.ShapeDtypeStruct((3,), jnp.float32)}
    >>> mask = sample_mask(0, params, density=0.01, min_per_leaf=1)
    >>> mask['w'].num_trainable, mask['b'].num_trainable
    (41, 1)
  """
  minimum = check_min_per_leaf(min_per_leaf)
  dist = resolve_distribution(distribution, density)
  key = _as_key(key)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  shapes_dtypes = [_shape_dtype(leaf) for _, leaf in flat]
  roles = _roles(paths, [d for _, d in shapes_dtypes], include, exclude, full)

  eligible = [i for i, r in enumerate(roles) if r == SPARSE]
  if not eligible and FULL not in roles:
    raise ValueError(
        f"no floating-point leaf is left to train after include={include!r}, exclude={exclude!r}, "
        f"full={full!r}; leaf paths look like {_example_paths(paths)}."
    )

  sizes = [math.prod(shapes_dtypes[i][0]) for i in eligible]
  for i, n in zip(eligible, sizes):
    if n > _MAX_LEAF_SIZE:
      raise ValueError(f"leaf {paths[i]!r} has {n:,} entries; int32 flat indices address at most {_MAX_LEAF_SIZE:,}.")
  model_entries = sum(math.prod(s) for s, d in shapes_dtypes if _is_trainable_dtype(d))
  full_entries = sum(math.prod(shapes_dtypes[i][0]) for i, r in enumerate(roles) if r == FULL)
  budgets = dist.budgets([paths[i] for i in eligible], sizes, model_entries=model_entries, full_entries=full_entries)
  # The minimum only ever raises a budget, so a mask without raised leaves is the one sampled without it.
  minima = [min(minimum, n) for n in sizes]
  if minimum:
    budgets = [max(int(b), int(dist.min_budget(shapes_dtypes[i][0], m)) if m else 0)
               for i, b, m in zip(eligible, budgets, minima)]
  if eligible and sum(budgets) == 0 and FULL not in roles:
    raise ValueError(
        f"{dist!r} selects no entry of the {sum(sizes):,} eligible entries; raise the density or pass "
        "min_per_leaf=1."
    )

  leaves: list[LeafMask] = []
  budget_of = dict(zip(eligible, budgets))
  minimum_of = dict(zip(eligible, minima))
  empty: list[int] = []  # Eligible leaves with entries that got none: frozen, and named in a warning.
  for i, (path, role) in enumerate(zip(paths, roles)):
    shape = shapes_dtypes[i][0]
    if role == SPARSE and math.prod(shape) == 0:
      leaves.append(LeafMask.frozen(shape))  # Nothing to train, nothing to warn about.
      continue
    if role == SPARSE and budget_of[i] == 0:
      empty.append(i)
      leaves.append(LeafMask.frozen(shape))
      continue
    sharding = leaf_sharding(flat[i][1]) if shard_local and role == SPARSE else None
    blocks = block_grid(shape, sharding)
    if role == SPARSE and blocks is not None:
      indices = _sample_blocked(dist, leaf_key(key, path), path, shape, blocks, budget_of[i], minimum_of[i])
      placement = compact_sharding(sharding)
      if placement is not None and not isinstance(indices, jax.core.Tracer):
        # Every process sampled the same values; each fills in its own devices' slices (multi-host safe).
        host = np.asarray(indices)
        indices = jax.make_array_from_callback(host.shape, placement, lambda index, host=host: host[index])
      leaves.append(LeafMask.sparse(shape, indices, blocks=blocks))
    elif role == SPARSE:
      leaf = leaf_key(key, path)
      indices = dist.sample(leaf, path, shape, budget_of[i])
      if np.shape(indices)[0] < minimum_of[i]:
        indices = _top_up(jax.random.fold_in(leaf, _TOP_UP_SALT), math.prod(shape), indices, minimum_of[i])
      if np.shape(indices)[0] == 0:  # A random count that came out 0.
        empty.append(i)
        leaves.append(LeafMask.frozen(shape))
      else:
        leaves.append(LeafMask.sparse(shape, indices))
    else:
      leaves.append(LeafMask(role, shape))
  if empty:
    _warn_empty(dist, [(paths[i], math.prod(shapes_dtypes[i][0])) for i in empty], len(eligible))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def check_min_per_leaf(min_per_leaf: Any) -> int:
  """``min_per_leaf`` as an int, or the error :func:`sample_mask` raises for it (callers may check it early).

  Example:

    >>> check_min_per_leaf(1)
    1
  """
  if isinstance(min_per_leaf, bool) or not isinstance(min_per_leaf, (int, np.integer)):
    raise TypeError(f"min_per_leaf must be a non-negative int, got {min_per_leaf!r} ({type(min_per_leaf).__name__}).")
  if min_per_leaf < 0:
    raise ValueError(f"min_per_leaf must be a non-negative int, got {min_per_leaf!r}.")
  return int(min_per_leaf)


# Folded into a leaf's key for the entries that top a short random draw up to the minimum (any fixed value would do).
_TOP_UP_SALT = 0x6D696E  # "min"


def _top_up(key: jax.Array, n: int, chosen: jax.Array, minimum: int) -> jax.Array:
  """``chosen`` (sorted, unique, fewer than ``minimum``) plus entries drawn uniformly from the rest of range(n)."""
  c = int(chosen.shape[0])
  chosen = jnp.asarray(chosen, jnp.int32)
  ranks = _choose_sorted(key, n - c, minimum - c)  # ranks among the n - c unchosen entries
  # The r-th unchosen entry is r plus the number of chosen entries at or below it, i.e. of chosen[i] - i <= r.
  extra = ranks + jnp.searchsorted(chosen - jnp.arange(c, dtype=jnp.int32), ranks, side="right").astype(jnp.int32)
  return jnp.sort(jnp.concatenate([chosen, extra]))


def _warn_empty(dist: Distribution, leaves: Sequence[tuple[str, int]], num_eligible: int) -> None:
  shown = ", ".join(f"{p!r} ({n:,} entries)" for p, n in leaves[:8])
  if len(leaves) > 8:
    shown += f", and {len(leaves) - 8} more"
  if num_eligible == 1:
    count = "the only sparse leaf gets no trainable entry at {} and stays frozen"
  elif len(leaves) == 1:
    count = f"1 of the {num_eligible} sparse leaves gets no trainable entry at {{}} and stays frozen"
  else:
    count = f"{len(leaves)} of the {num_eligible} sparse leaves get no trainable entry at {{}} and stay frozen"
  warnings.warn(
      f"sample_mask: {count.format(repr(dist))}: {shown}. "
      "To train every leaf, pass min_per_leaf=1 (also spra.masked(..., min_per_leaf=1)) or a higher density.",
      UserWarning,
      stacklevel=3,
  )


def _sample_blocked(dist: Distribution, key: jax.Array, path: str, shape: tuple[int, ...],
                    blocks: tuple[int, ...], budget: int, minimum: int = 0) -> jax.Array:
  """Block-major, per-block sorted global flat indices, the same count per block (at least ``minimum`` in all)."""
  if not dist.exact:
    raise ValueError(
        f"leaf {path!r} is sharded into blocks {blocks}; shard-local sampling needs the same count in every "
        f"block, which {dist!r} does not give. Use an exact distribution (e.g. spra.masks.uniform), or "
        "sample_mask(..., shard_local=False)."
    )
  local_shape = tuple(s // b for s, b in zip(shape, blocks))
  num_blocks = math.prod(blocks)
  # Rounding k to a multiple of the blocks may round it below the minimum: then take the next multiple.
  per_block = max(block_budget(int(budget), num_blocks, math.prod(local_shape)), -(-minimum // num_blocks))
  if per_block == 0:
    return jnp.zeros((0,), jnp.int32)
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_blocks, dtype=jnp.uint32))
  local = jax.vmap(lambda k: dist.sample(k, path, local_shape, per_block))(keys)  # [num_blocks, per_block]
  # Local flat index -> global flat index: add each block's offset per dimension.
  block_coords = np.stack(np.unravel_index(np.arange(num_blocks), blocks), axis=-1)  # [num_blocks, ndim]
  flat = jnp.zeros(local.shape, jnp.int32)
  rest = local.astype(jnp.int32)
  for d in reversed(range(len(shape))):
    coord = rest % local_shape[d] + jnp.asarray(block_coords[:, d] * local_shape[d], jnp.int32)[:, None]
    rest = rest // local_shape[d]
    flat = flat + coord * math.prod(shape[d + 1:])
  return flat.reshape(-1)
