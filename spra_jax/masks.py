"""Sparse random masks over parameter pytrees.

A *mask* says, for every leaf of a parameter pytree, which of its scalar entries
are trainable. It is a pytree with the structure of the parameters whose leaves
are :class:`LeafMask` nodes, each one of:

* ``frozen``: no entry trains;
* ``full``: every entry trains (e.g. a classification head);
* ``sparse``: the entries at ``indices`` train, a sorted, unique, int32 vector of
  flat (row-major) positions into the leaf.

The kind and the shape of a leaf are static pytree metadata; the indices are an
ordinary array leaf, so masks go through ``jax.jit``, ``device_put`` and
checkpoints as data, never as constants baked into a compiled program.

Masks are sampled by a :class:`Distribution`, which has two parts. An
*allocation rule* turns a global density into a budget per leaf, and a *sampler*
places each leaf's budget. Every leaf draws from its own key,
``fold_in(key, stable_hash(path))``, so adding, removing or reordering leaves
never changes another leaf's mask.

Example:

  >>> import jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> params = {'dense': {'kernel': jnp.zeros((64, 32)), 'bias': jnp.zeros(32)},
  ...           'head': {'kernel': jnp.zeros((32, 2))}}
  >>> mask = spra.sample_mask(jax.random.key(0), params, spra.masks.uniform(0.1),
  ...                         include='dense', full='head')
  >>> spra.num_trainable(mask)   # 10 % of 2,080 dense entries + 64 head entries
  272
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FROZEN",
    "FULL",
    "SPARSE",
    "LeafMask",
    "Distribution",
    "Uniform",
    "Bernoulli",
    "uniform",
    "bernoulli",
    "register",
    "get",
    "available",
    "sample_mask",
    "leaf_roles",
    "num_trainable",
    "summary",
    "summary_rows",
    "validate",
    "from_dense",
    "to_dense",
    "path_str",
    "leaf_key",
    "is_leaf_mask",
    "block_grid",
    "leaf_sharding",
    "compact_sharding",
    "block_budget",
]

FROZEN = "frozen"
FULL = "full"
SPARSE = "sparse"
_KINDS = (FROZEN, FULL, SPARSE)

# Flat positions are int32: a leaf may hold at most this many entries.
_MAX_LEAF_SIZE = np.iinfo(np.int32).max

Pattern = str | Sequence[str] | re.Pattern | None


# --------------------------------------------------------------------------
# The per-leaf mask node.
# --------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class LeafMask:
  """Which entries of one parameter leaf are trainable.

  Build one with :meth:`frozen`, :meth:`full` or :meth:`sparse`. ``kind``,
  ``shape`` and ``blocks`` are static metadata; ``indices`` (sparse leaves only)
  is the single array child, so a pytree of ``LeafMask`` flattens to its index
  vectors.

  ``blocks`` (sparse leaves only) is the shard grid of a *shard-local* mask:
  the number of equal blocks along each dimension of the leaf, as a sharding
  splits it (``(1, 8)`` for a kernel whose columns are split over 8 devices).
  The indices are then block-major: ``indices`` is ``num_blocks`` equal slices,
  slice j holds entries of block j only (blocks numbered row-major over the
  grid), sorted within the slice. When the blocks are contiguous ranges of the
  flat leaf (only the leading dimension split) this is the usual globally
  sorted order; otherwise the indices are unique but sorted only per slice.
  ``None`` (the default) means one block: sorted, unique indices.

  Example:

    >>> import jax.numpy as jnp
    >>> m = LeafMask.sparse((4, 4), jnp.array([1, 5, 14], jnp.int32))
    >>> m.num_trainable, m.size
    (3, 16)
    >>> LeafMask.sparse((4, 4), jnp.array([0, 4, 2, 7], jnp.int32), blocks=(1, 2))
    LeafMask.sparse(shape=(4, 4), k=4, blocks=(1, 2))
  """

  __slots__ = ("kind", "shape", "indices", "blocks")

  def __init__(self, kind: str, shape: Sequence[int], indices: Any = None, blocks: Sequence[int] | None = None):
    if kind not in _KINDS:
      raise ValueError(f"LeafMask kind must be one of {_KINDS}, got {kind!r}.")
    self.kind = kind
    self.shape = tuple(int(d) for d in shape)
    self.indices = indices
    self.blocks = _check_blocks(self.shape, blocks) if kind == SPARSE else None

  @classmethod
  def frozen(cls, shape: Sequence[int]) -> LeafMask:
    """A leaf none of whose entries train."""
    return cls(FROZEN, shape)

  @classmethod
  def full(cls, shape: Sequence[int]) -> LeafMask:
    """A leaf all of whose entries train."""
    return cls(FULL, shape)

  @classmethod
  def sparse(cls, shape: Sequence[int], indices: Any, *, blocks: Sequence[int] | None = None) -> LeafMask:
    """A leaf whose entries at the flat ``indices`` train (``blocks``: see the class)."""
    return cls(SPARSE, shape, indices, blocks)

  @property
  def size(self) -> int:
    """Number of entries of the leaf."""
    return math.prod(self.shape)

  @property
  def num_trainable(self) -> int:
    """Number of trainable entries (static: it is the indices' length)."""
    if self.kind == FULL:
      return self.size
    if self.kind == SPARSE:
      return int(np.shape(self.indices)[0])
    return 0

  @property
  def density(self) -> float:
    """Fraction of the leaf's entries that train."""
    return self.num_trainable / self.size if self.size else 0.0

  @property
  def num_blocks(self) -> int:
    """Number of shard blocks the indices are stratified over (1 if not shard-local)."""
    return math.prod(self.blocks) if self.blocks is not None else 1

  @property
  def indices_sorted(self) -> bool:
    """True when the indices are sorted over the whole leaf (always, unless shard-local).

    Shard-local indices are globally sorted when each block is a contiguous
    range of the flat leaf: at most one dimension is split and every dimension
    before it has size 1.
    """
    if self.blocks is None:
      return True
    split = [d for d, b in enumerate(self.blocks) if b > 1]
    return len(split) == 1 and math.prod(self.shape[: split[0]]) == 1

  def tree_flatten(self):
    children = (self.indices,) if self.kind == SPARSE else ()
    return children, (self.kind, self.shape, self.blocks)

  @classmethod
  def tree_unflatten(cls, aux, children):
    kind, shape, blocks = aux
    obj = object.__new__(cls)
    obj.kind, obj.shape, obj.blocks = kind, shape, blocks
    obj.indices = children[0] if kind == SPARSE else None
    return obj

  def __repr__(self) -> str:
    if self.kind == SPARSE:
      blocks = "" if self.blocks is None else f", blocks={self.blocks}"
      return f"LeafMask.sparse(shape={self.shape}, k={self.num_trainable}{blocks})"
    return f"LeafMask.{self.kind}(shape={self.shape})"


def _check_blocks(shape: tuple[int, ...], blocks: Sequence[int] | None) -> tuple[int, ...] | None:
  """Validates a shard grid for ``shape``; an all-ones grid is normalised to None."""
  if blocks is None:
    return None
  blocks = tuple(int(b) for b in blocks)
  if len(blocks) != len(shape) or any(b < 1 or s % b for s, b in zip(shape, blocks)):
    raise ValueError(
        f"blocks must give, per dimension, a number of equal blocks that divides the size; "
        f"got blocks={blocks} for shape {shape}."
    )
  return None if all(b == 1 for b in blocks) else blocks


def block_grid(shape: Sequence[int], sharding: Any) -> tuple[int, ...] | None:
  """The shard grid a ``jax.sharding.Sharding`` cuts a leaf of ``shape`` into.

  Returns the number of blocks per dimension, or None when the leaf is not
  split (one device, or replicated) or is split unevenly (padded shards).

  Example:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ('tensor',))
    >>> block_grid((64, 32), NamedSharding(mesh, P(None, 'tensor'))) is None  # one device: no split
    True
  """
  shape = tuple(int(d) for d in shape)
  if sharding is None or not hasattr(sharding, "shard_shape"):
    return None
  local = tuple(int(d) for d in sharding.shard_shape(shape))
  if any(ls == 0 or s % ls for s, ls in zip(shape, local)):
    return None
  return _check_blocks(shape, tuple(s // ls for s, ls in zip(shape, local)))


def leaf_sharding(leaf: Any) -> Any:
  """The sharding a (concrete or abstract) leaf carries, or None (tracers, numpy arrays)."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf.sharding
  if isinstance(leaf, jax.Array):
    try:
      return leaf.sharding
    except Exception:  # noqa: BLE001 - deleted or otherwise unreadable arrays carry no usable sharding.
      return None
  return None


def compact_sharding(sharding: Any) -> Any:
  """The sharding of a shard-local compact vector for a leaf with ``sharding``.

  For a ``NamedSharding`` with spec ``P(a, (b, c))`` the compact ``[k]``
  vector is sharded ``P((a, b, c))``: its j-th slice lives on the devices that
  hold block j of the leaf (blocks numbered row-major), and it is replicated
  over the mesh axes the leaf is replicated over. Other shardings give None.

  Example:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ('tensor',))
    >>> compact_sharding(NamedSharding(mesh, P(None, 'tensor'))).spec
    P('tensor',)
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  axes: list[str] = []
  for entry in sharding.spec:
    if entry is None:
      continue
    axes.extend(entry if isinstance(entry, tuple) else (entry,))
  spec = jax.sharding.PartitionSpec(tuple(axes)) if axes else jax.sharding.PartitionSpec()
  return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def is_leaf_mask(x: Any) -> bool:
  """True for a :class:`LeafMask` (use as ``is_leaf`` in tree functions)."""
  return isinstance(x, LeafMask)


# --------------------------------------------------------------------------
# Paths and keys.
# --------------------------------------------------------------------------


def _key_name(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """Joins a JAX key path with ``/``, e.g. ``layers/3/attn/v_proj/kernel``.

  The trailing ``value`` attribute of Flax NNX variables is dropped, so the
  state of an NNX module and its plain-dict form give the same paths.

  Example:

    >>> import jax
    >>> [(p, _)] = jax.tree_util.tree_flatten_with_path({'a': [0, 1]})[0][1:]
    >>> path_str(p)
    'a/1'
  """
  names = [_key_name(k) for k in path]
  if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def _stable_hash(path: str) -> np.uint32:
  # Python's hash() is salted per process; blake2b is the same everywhere.
  digest = hashlib.blake2b(path.encode("utf-8"), digest_size=4).digest()
  return np.uint32(int.from_bytes(digest, "little"))


def _as_key(key: Any) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
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


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    arr = np.asarray(leaf)
    shape, dtype = arr.shape, arr.dtype
  return tuple(int(d) for d in shape), np.dtype(dtype)


def _is_trainable_dtype(dtype: np.dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


# --------------------------------------------------------------------------
# Exact-k sampling without replacement, in memory proportional to k.
# --------------------------------------------------------------------------


def _expected_duplicates(n: int, t: int) -> float:
  """Expected number of repeats among t uniform draws from n values."""
  distinct = n * -math.expm1(t * math.log1p(-1.0 / n)) if n > 1 else 1.0
  return max(t - distinct, 0.0)


def _oversample_margin(n: int, k: int) -> int:
  m = 0
  for _ in range(3):  # A fixed point: more draws bring a few more repeats.
    e = _expected_duplicates(n, k + m)
    m = int(math.ceil(e + 6.0 * math.sqrt(e) + 8))
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
  return min(n, int(math.ceil(1.05 ** math.ceil(math.log(k, 1.05)))))


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

  first_try, ok = attempt(0)
  _, out, _ = jax.lax.while_loop(lambda c: ~c[2], body, (jnp.int32(0), first_try, ok))
  return out


def _concrete_count(value: Any, what: str) -> int:
  try:
    with jax.ensure_compile_time_eval():
      return int(value)
  except jax.errors.ConcretizationTypeError as e:
    raise ValueError(
        f"{what} draws a random number of entries per leaf, which needs a concrete "
        "key: call spra.sample_mask outside jax.jit and pass the mask in."
    ) from e


# --------------------------------------------------------------------------
# Distributions: an allocation rule plus a sampler.
# --------------------------------------------------------------------------

Allocation = str | Mapping[str, float] | Callable[[Sequence[str], Sequence[int], int], Sequence[int]]


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


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
    compiled = [(re.compile(p), float(d)) for p, d in rule.items()]
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

  Example:

    >>> get('bernoulli', 0.01)
    Bernoulli(0.01)
  """
  try:
    cls = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown mask distribution {name!r}; available: {', '.join(available())}.") from None
  return cls(density, **kwargs)


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


def uniform(density: float, **kwargs: Any) -> Uniform:
  """Exactly k = round(density · size) entries per leaf, without replacement.

  See :class:`Distribution` for ``allocation`` and ``relative_to``.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 100))}, uniform(0.01))
    >>> m['w'].num_trainable
    100
  """
  return Uniform(density, **kwargs)


def bernoulli(density: float, **kwargs: Any) -> Bernoulli:
  """Each entry independently with probability ``density`` (the paper's code).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 100))}, bernoulli(0.01))
    >>> 60 < m['w'].num_trainable < 140
    True
  """
  return Bernoulli(density, **kwargs)


# --------------------------------------------------------------------------
# Structured and score-based distributions (for ablations).
# --------------------------------------------------------------------------


def _lines_count(budget: int, line: int, lines: int) -> int:
  """Whole lines of ``line`` entries closest to ``budget`` (at least one if any)."""
  if budget <= 0:
    return 0
  return min(lines, max(1, _round_half_up(budget / line)))


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
  """A leaf seen as a matrix: its first axis by the product of the others."""
  return shape[0], math.prod(shape[1:])


@register
class Rows(Distribution):
  """Whole rows (entries sharing their first index), chosen uniformly.

  A kernel ``[in, out]`` then trains every output weight of a few input
  features. The count is rounded to whole rows (at least one when the budget
  is positive), so ``exact`` is False. 1-D leaves fall back to single entries.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 50))}, rows(0.02))
    >>> m['w'].num_trainable, len(set((m['w'].indices // 50).tolist()))
    (100, 2)
  """

  name = "rows"
  exact = False

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_rows, row = _as_matrix(shape)
    chosen = _choose_sorted(key, n_rows, _lines_count(int(budget), row, n_rows))
    return (chosen[:, None] * row + jnp.arange(row, dtype=jnp.int32)[None, :]).reshape(-1)


@register
class Columns(Distribution):
  """Whole columns (entries sharing their last index), chosen uniformly.

  A kernel ``[in, out]`` then trains every input weight of a few output
  units. Counts are rounded to whole columns; 1-D leaves fall back to single
  entries.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 50))}, columns(0.04))
    >>> m['w'].num_trainable, len(set((m['w'].indices % 50).tolist()))
    (200, 2)
  """

  name = "columns"
  exact = False

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_cols = shape[-1]
    col = math.prod(shape) // n_cols
    chosen = _choose_sorted(key, n_cols, _lines_count(int(budget), col, n_cols))
    # Row-major flat indices: every chosen column in each row, rows in order: sorted.
    return (jnp.arange(col, dtype=jnp.int32)[:, None] * n_cols + chosen[None, :]).reshape(-1)


@register
class Blocks(Distribution):
  """Random ``block``-shaped tiles of each leaf (seen as a matrix), uniformly.

  Tiles align with a ``block[0] × block[1]`` grid, as a matmul kernel's tiles
  do; edge tiles are clipped. The count is rounded to whole tiles (at least
  one when the budget is positive). 1-D leaves fall back to single entries.

  Args:
    density: see :class:`Distribution`.
    block: the tile shape (rows, columns).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((64, 64))}, blocks(0.0625, block=(8, 8)))
    >>> m['w'].num_trainable, len({(int(i) // 64 // 8, int(i) % 64 // 8) for i in m['w'].indices})
    (256, 4)
  """

  name = "blocks"
  exact = False

  def __init__(self, density: float, *, block: tuple[int, int] = (16, 16), **kwargs: Any):
    super().__init__(density, **kwargs)
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
      raise ValueError(f"block must be two positive ints (rows, columns), got {block!r}.")
    self.block = block

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_rows, n_cols = _as_matrix(shape)
    br, bc = min(self.block[0], n_rows), min(self.block[1], n_cols)
    grid_r, grid_c = -(-n_rows // br), -(-n_cols // bc)
    tiles = np.asarray(_choose_sorted(key, grid_r * grid_c, _lines_count(int(budget), br * bc, grid_r * grid_c)))
    rows = (tiles // grid_c)[:, None] * br + np.arange(br)[None, :]   # [tiles, br]
    cols = (tiles % grid_c)[:, None] * bc + np.arange(bc)[None, :]    # [tiles, bc]
    flat = rows[:, :, None] * n_cols + cols[:, None, :]
    valid = (rows[:, :, None] < n_rows) & (cols[:, None, :] < n_cols)
    return jnp.asarray(np.sort(flat[valid]).astype(np.int32))

  def spec(self) -> dict[str, Any]:
    return {**super().spec(), "block": list(self.block)}


class TopK(Distribution):
  """The ``budget`` entries of each leaf with the largest (or smallest) score.

  Scores are data, not randomness: magnitudes of the pretrained weights
  (:func:`magnitude`), a Fisher information estimate (:func:`fisher_scores`,
  as the FISH mask does), or any array per leaf. Ties go to the lower index.
  The key is unused. Memory is O(leaf size) for the leaf being ranked.

  Args:
    density: see :class:`Distribution`.
    scores: a pytree with the structure (or at least the eligible leaves) of
      the params, holding one score array per leaf of the leaf's shape.
    largest: take the largest scores (True) or the smallest (False).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> w = {'w': jnp.array([[0.1, -3.0], [2.0, 0.0]])}
    >>> sample_mask(0, w, top_k(0.5, jax.tree.map(jnp.abs, w)))['w'].indices.tolist()
    [1, 2]
  """

  name = "top-k"

  def __init__(self, density: float, scores: Any, *, largest: bool = True, **kwargs: Any):
    super().__init__(density, **kwargs)
    flat, _ = jax.tree_util.tree_flatten_with_path(scores)
    self._scores = {path_str(p): leaf for p, leaf in flat}
    self.largest = bool(largest)

  def sample(self, key, path, shape, budget):
    if path not in self._scores:
      raise ValueError(f"top-k scores have no leaf {path!r}; they have {_example_paths(sorted(self._scores))}.")
    score = jnp.asarray(self._scores[path])
    if score.shape != tuple(shape):
      raise ValueError(f"top-k scores at {path!r} have shape {score.shape}, expected the leaf's shape {tuple(shape)}.")
    flat = score.reshape(-1).astype(jnp.float32)
    _, idx = jax.lax.top_k(flat if self.largest else -flat, int(budget))
    return jnp.sort(idx.astype(jnp.int32))

  def spec(self) -> dict[str, Any]:
    return {**super().spec(), "largest": self.largest}


def rows(density: float, **kwargs: Any) -> Rows:
  """Whole rows of each leaf; see :class:`Rows`."""
  return Rows(density, **kwargs)


def columns(density: float, **kwargs: Any) -> Columns:
  """Whole columns of each leaf; see :class:`Columns`."""
  return Columns(density, **kwargs)


def blocks(density: float, *, block: tuple[int, int] = (16, 16), **kwargs: Any) -> Blocks:
  """Random tiles of each leaf; see :class:`Blocks`."""
  return Blocks(density, block=block, **kwargs)


def top_k(density: float, scores: Any, *, largest: bool = True, **kwargs: Any) -> TopK:
  """The highest- (or lowest-) scoring entries of each leaf; see :class:`TopK`."""
  return TopK(density, scores, largest=largest, **kwargs)


def magnitude(density: float, params: Any, *, largest: bool = True, **kwargs: Any) -> TopK:
  """The entries of largest (or smallest) absolute value in the given weights.

  Example:

    >>> import jax.numpy as jnp
    >>> p = {'w': jnp.array([0.5, -2.0, 0.1, 1.0])}
    >>> sample_mask(0, p, magnitude(0.5, p, largest=False))['w'].indices.tolist()
    [0, 2]
  """
  return TopK(density, jax.tree.map(jnp.abs, params), largest=largest, **kwargs)


@functools.lru_cache(maxsize=8)
def _cached_grad(loss_fn: Callable[..., jax.Array]) -> Callable:
  return jax.jit(jax.grad(loss_fn))


def _jitted_grad(loss_fn: Callable[..., jax.Array]) -> Callable:
  """One compiled gradient per loss function (the last few kept), so the Fisher scores of every run of a sweep
  compile once."""
  try:
    return _cached_grad(loss_fn)
  except TypeError:  # an unhashable callable: no cache
    return jax.jit(jax.grad(loss_fn))


def fisher_scores(loss_fn: Callable[..., jax.Array], params: Any, batches: Any) -> Any:
  """A diagonal empirical Fisher estimate: squared gradients summed over batches.

  ``loss_fn(params, *batch)`` is the mean loss of a batch; ``batches`` is an
  iterable of argument tuples. This is the batch-level estimate (one squared
  gradient per batch); with batches of one example it is the per-example
  estimate the FISH mask uses. It forms dense gradients, so it costs what one
  full fine-tuning step costs, once per batch. Use with :func:`top_k`.

  Example:

    >>> import jax.numpy as jnp
    >>> loss = lambda p, x: jnp.sum(p['w'] * x) ** 2
    >>> s = fisher_scores(loss, {'w': jnp.ones(3)}, [(jnp.array([1., 0., 0.]),), (jnp.array([0., 2., 0.]),)])
    >>> s['w'].tolist()
    [4.0, 64.0, 0.0]
  """
  grad = _jitted_grad(loss_fn)
  total = None
  for batch in batches:
    g = grad(params, *(batch if isinstance(batch, tuple) else (batch,)))
    sq = jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), g)
    total = sq if total is None else jax.tree.map(jnp.add, total, sq)
  if total is None:
    raise ValueError("fisher_scores needs at least one batch.")
  return total


def resolve_distribution(distribution: Distribution | str | None, density: float | None) -> Distribution:
  """Turns the ``distribution``/``density`` arguments of the public API into an object."""
  if isinstance(distribution, Distribution):
    if density is not None and float(density) != distribution.density:
      raise ValueError(
          f"density={density} conflicts with the distribution's own density {distribution.density}; "
          "give one of them."
      )
    return distribution
  if density is None:
    raise ValueError("a density is needed: pass density=... or a Distribution such as spra.masks.uniform(0.01).")
  if distribution is None:
    return Uniform(density)
  if isinstance(distribution, str):
    return get(distribution, density)
  raise TypeError(f"distribution must be a Distribution or a registered name, got {type(distribution).__name__}.")


# --------------------------------------------------------------------------
# Sampling a mask over a pytree.
# --------------------------------------------------------------------------


def _compile(pattern: Pattern, name: str) -> re.Pattern | None:
  if pattern is None:
    return None
  if isinstance(pattern, re.Pattern):
    return pattern
  if isinstance(pattern, str):
    return re.compile(pattern)
  if isinstance(pattern, Sequence) and all(isinstance(p, str) for p in pattern):
    return re.compile("|".join(f"(?:{p})" for p in pattern))
  raise TypeError(f"{name} must be a regex string, a list of them or None; got {pattern!r}.")


def _example_paths(paths: Sequence[str], limit: int = 6) -> str:
  shown = ", ".join(repr(p) for p in paths[:limit])
  return shown + (f", … ({len(paths)} leaves)" if len(paths) > limit else "")


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
) -> Any:
  """Samples a sparse random mask over a parameter pytree.

  Args:
    key: a PRNG key (``jax.random.key``) or an int seed.
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

  Only floating-point leaves can train. Each eligible leaf draws from
  :func:`leaf_key` ``(key, path)``.

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
    ValueError: for a density outside (0, 1], a pattern that matches no leaf, an
      empty selection or a budget larger than the eligible entries.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> params = {'attn': {'v_proj': {'kernel': jax.ShapeDtypeStruct((512, 512), jnp.float32)},
    ...                    'q_proj': {'kernel': jax.ShapeDtypeStruct((512, 512), jnp.float32)}},
    ...           'score': {'kernel': jax.ShapeDtypeStruct((512, 2), jnp.float32)}}
    >>> mask = sample_mask(jax.random.key(0), params, density=0.01,
    ...                    include=r'v_proj', full=r'score')
    >>> [m.num_trainable for m in jax.tree.leaves(mask, is_leaf=is_leaf_mask)]
    [0, 2621, 1024]
  """
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
  if eligible and sum(budgets) == 0 and FULL not in roles:
    raise ValueError(
        f"{dist!r} selects no entry of the {sum(sizes):,} eligible entries; raise the density."
    )

  leaves: list[LeafMask] = []
  budget_of = dict(zip(eligible, budgets))
  for i, (path, role) in enumerate(zip(paths, roles)):
    shape = shapes_dtypes[i][0]
    sharding = leaf_sharding(flat[i][1]) if shard_local and role == SPARSE else None
    blocks = block_grid(shape, sharding)
    if role == SPARSE and blocks is not None:
      indices = _sample_blocked(dist, leaf_key(key, path), path, shape, blocks, budget_of[i])
      placement = compact_sharding(sharding)
      if placement is not None and not isinstance(indices, jax.core.Tracer):
        # Every process sampled the same values; each fills in its own devices' slices (multi-host safe).
        host = np.asarray(indices)
        indices = jax.make_array_from_callback(host.shape, placement, lambda index, host=host: host[index])
      leaves.append(LeafMask.sparse(shape, indices, blocks=blocks))
    elif role == SPARSE:
      indices = dist.sample(leaf_key(key, path), path, shape, budget_of[i])
      leaves.append(LeafMask.sparse(shape, indices))
    else:
      leaves.append(LeafMask(role, shape))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def block_budget(budget: int, num_blocks: int, block_size: int) -> int:
  """Entries per block for a shard-local leaf: ``budget / num_blocks`` rounded half up.

  At least one per block when ``budget > 0``, at most ``block_size``.

  Example:

    >>> block_budget(100, 8, 1000), block_budget(3, 8, 1000), block_budget(0, 8, 1000)
    (13, 1, 0)
  """
  if budget <= 0:
    return 0
  return min(block_size, max(1, _round_half_up(budget / num_blocks)))


def _sample_blocked(dist: Distribution, key: jax.Array, path: str, shape: tuple[int, ...],
                    blocks: tuple[int, ...], budget: int) -> jax.Array:
  """Block-major, per-block sorted global flat indices, the same count per block."""
  if not dist.exact:
    raise ValueError(
        f"leaf {path!r} is sharded into blocks {blocks}; shard-local sampling needs the same count in every "
        f"block, which {dist!r} does not give. Use an exact distribution (e.g. spra.masks.uniform), or "
        "sample_mask(..., shard_local=False)."
    )
  local_shape = tuple(s // b for s, b in zip(shape, blocks))
  num_blocks = math.prod(blocks)
  per_block = block_budget(int(budget), num_blocks, math.prod(local_shape))
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


# --------------------------------------------------------------------------
# Inspection and validation.
# --------------------------------------------------------------------------


def _leaf_masks_with_paths(mask: Any) -> list[tuple[str, LeafMask]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)
  out = []
  for p, m in flat:
    if not isinstance(m, LeafMask):
      raise TypeError(f"mask leaf at {path_str(p)!r} is a {type(m).__name__}, expected a LeafMask.")
    out.append((path_str(p), m))
  return out


def num_trainable(mask: Any) -> int:
  """Total number of trainable entries of a mask.

  Example:

    >>> num_trainable({'a': LeafMask.full((3, 4)), 'b': LeafMask.frozen((5,))})
    12
  """
  return sum(m.num_trainable for _, m in _leaf_masks_with_paths(mask))


def summary_rows(mask: Any) -> list[dict[str, Any]]:
  """Per-leaf rows: path, shape, kind, trainable count and density.

  Example:

    >>> summary_rows({'w': LeafMask.full((2, 2))})[0]['trainable']
    4
  """
  return [
      {"path": p, "shape": m.shape, "kind": m.kind, "size": m.size, "trainable": m.num_trainable, "density": m.density}
      for p, m in _leaf_masks_with_paths(mask)
  ]


def summary(mask: Any, *, show_frozen: bool = True) -> str:
  """A readable per-leaf table of a mask, with totals.

  Example:

    >>> print(summary({'head': LeafMask.full((4, 2)), 'emb': LeafMask.frozen((10, 4))}))
    path  shape    kind    trainable  density
    ----  -------  ------  ---------  --------
    emb   (10, 4)  frozen          0  0.000%
    head  (4, 2)   full            8  100.000%
    total 48 entries, 8 trainable (16.667%)
  """
  rows = summary_rows(mask)
  total = sum(r["size"] for r in rows)
  trained = sum(r["trainable"] for r in rows)
  shown = [r for r in rows if show_frozen or r["kind"] != FROZEN]
  table = [("path", "shape", "kind", "trainable", "density")]
  table += [(r["path"], str(r["shape"]), r["kind"], f"{r['trainable']:,}", f"{100 * r['density']:.3f}%") for r in shown]
  widths = [max(len(row[c]) for row in table) for c in range(5)]
  lines = []
  for j, row in enumerate(table):
    cells = [row[c].rjust(widths[c]) if c == 3 else row[c].ljust(widths[c]) for c in range(5)]
    lines.append("  ".join(cells).rstrip())
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  pct = 100 * trained / total if total else 0.0
  lines.append(f"total {total:,} entries, {trained:,} trainable ({pct:.3f}%)")
  return "\n".join(lines)


def validate(mask: Any, params: Any, *, check_indices: bool = True) -> None:
  """Checks that ``mask`` fits ``params``; raises ``ValueError`` naming the leaf.

  Checks the tree structure, each leaf's shape, and (for concrete sparse
  indices, when ``check_indices``) that indices are int32, 1-D, sorted, unique
  and in range.

  Example:

    >>> import jax.numpy as jnp
    >>> validate({'w': LeafMask.full((2, 3))}, {'w': jnp.zeros((3, 2))})
    Traceback (most recent call last):
    ...
    ValueError: mask leaf 'w' has shape (2, 3) but the parameter has shape (3, 2).
  """
  mask_flat = _leaf_masks_with_paths(mask)
  params_flat, params_def = jax.tree_util.tree_flatten_with_path(params)
  mask_def = jax.tree.structure(mask, is_leaf=is_leaf_mask)
  if mask_def != params_def:
    mask_paths = {p for p, _ in mask_flat}
    param_paths = {path_str(p) for p, _ in params_flat}
    missing = sorted(param_paths - mask_paths)
    extra = sorted(mask_paths - param_paths)
    detail = []
    if missing:
      detail.append(f"parameters without a mask leaf: {_example_paths(missing)}")
    if extra:
      detail.append(f"mask leaves without a parameter: {_example_paths(extra)}")
    if not detail:
      detail.append(f"the containers differ: mask {mask_def} vs params {params_def}")
    raise ValueError("mask does not match the parameter tree; " + "; ".join(detail) + ".")
  for (path, m), (_, leaf) in zip(mask_flat, params_flat):
    shape, dtype = _shape_dtype(leaf)
    if m.shape != shape:
      raise ValueError(f"mask leaf {path!r} has shape {m.shape} but the parameter has shape {shape}.")
    if m.kind != FROZEN and not _is_trainable_dtype(dtype):
      raise ValueError(f"mask leaf {path!r} is {m.kind} but the parameter has non-floating dtype {dtype}.")
    if m.kind == SPARSE:
      _validate_indices(path, m, check_values=check_indices)


def _validate_indices(path: str, m: LeafMask, *, check_values: bool) -> None:
  idx = m.indices
  ishape, idtype = _shape_dtype(idx)
  if len(ishape) != 1 or idtype != np.int32:
    raise ValueError(f"mask leaf {path!r}: indices must be a 1-D int32 vector, got {idtype}{list(ishape)}.")
  if not check_values or isinstance(idx, (jax.core.Tracer, jax.ShapeDtypeStruct)) or ishape[0] == 0:
    return
  values = np.asarray(idx)
  if values.min() < 0 or values.max() >= m.size:
    raise ValueError(f"mask leaf {path!r}: indices must lie in [0, {m.size}), got [{values.min()}, {values.max()}].")
  if m.blocks is None:
    if np.any(np.diff(values) <= 0):
      raise ValueError(f"mask leaf {path!r}: indices must be sorted and unique.")
    return
  if ishape[0] % m.num_blocks:
    raise ValueError(
        f"mask leaf {path!r}: {ishape[0]} indices cannot split into {m.num_blocks} equal slices (blocks {m.blocks})."
    )
  per_slice = values.reshape(m.num_blocks, -1)
  if np.any(np.diff(per_slice, axis=1) <= 0):
    raise ValueError(f"mask leaf {path!r}: indices must be sorted and unique within each of the {m.num_blocks} slices.")
  coords = np.unravel_index(values, m.shape)
  block_of = np.ravel_multi_index(
      tuple(c // (s // b) for c, s, b in zip(coords, m.shape, m.blocks)), m.blocks
  ).reshape(m.num_blocks, -1)
  if np.any(block_of != np.arange(m.num_blocks)[:, None]):
    raise ValueError(
        f"mask leaf {path!r}: slice j of the indices must lie in shard block j of the grid {m.blocks} "
        "(blocks numbered row-major)."
    )


def from_dense(bool_tree: Any) -> Any:
  """Builds a mask from a pytree of boolean arrays (True = trainable).

  All-False leaves become frozen and all-True leaves full. This is the way in
  for masks chosen by any other rule (magnitudes, saliency scores, ...).

  Example:

    >>> import numpy as np
    >>> m = from_dense({'w': np.array([[True, False], [False, True]])})
    >>> m['w'], m['w'].indices.tolist()
    (LeafMask.sparse(shape=(2, 2), k=2), [0, 3])
  """

  def one(leaf):
    arr = np.asarray(leaf)
    if arr.dtype != np.bool_:
      raise TypeError(f"from_dense expects boolean arrays, got {arr.dtype}.")
    if not arr.any():
      return LeafMask.frozen(arr.shape)
    if arr.all():
      return LeafMask.full(arr.shape)
    return LeafMask.sparse(arr.shape, jnp.asarray(np.flatnonzero(arr.reshape(-1)), jnp.int32))

  return jax.tree.map(one, bool_tree)


def to_dense(mask: Any) -> Any:
  """The boolean array form of a mask (True = trainable), one array per leaf.

  Example:

    >>> to_dense({'w': LeafMask.sparse((2, 2), jnp.array([1], jnp.int32))})['w'].tolist()
    [[False, True], [False, False]]
  """

  def one(m: LeafMask):
    if m.kind == FULL:
      return jnp.ones(m.shape, bool)
    if m.kind == FROZEN:
      return jnp.zeros(m.shape, bool)
    return jnp.zeros((m.size,), bool).at[m.indices].set(True).reshape(m.shape)

  return jax.tree.map(one, mask, is_leaf=is_leaf_mask)
