"""Resumable training checkpoints on ``orbax.checkpoint.CheckpointManager``.

:class:`TrainCheckpointer` saves, per step, any pytree of training state (the
parameters or a :class:`~spra_jax.SparseDelta`, the optimizer state, including
``spra.masked``'s :class:`~spra_jax.SparseMaskedState` with its mask indices,
and :class:`~spra_jax.LeanState`), plus the step, the data position, an RNG key
and JSON metadata. Saves are asynchronous: ``save`` returns once the arrays are
on the host, and Orbax writes them in the background; a retention policy keeps
the last ``max_to_keep`` checkpoints and, with ``keep_every_n_steps``, every
n-th for good.

A ``LeanState`` is stored leanly: its weights are the frozen base everywhere
but at the mask, so only the k trained entries of ``params`` are written, and
``restore`` writes them back into ``base_params``. That is bit-exact (the
entries are copied, not recomputed as base + delta).

Resume is exact: Orbax writes each step into a temporary directory and renames
it when complete, so a run killed at any moment (even by SIGKILL) leaves the
previous checkpoints intact, and ``restore`` of the latest step continues with
bit-identical numbers.

Zero-size arrays (the mask indices, compact values and optimizer moments of a
sparse leaf that got no entries) are stored as their shape and dtype in the
checkpoint's JSON, as Orbax refuses to write them, and made again on restore;
such states save, restore and resume like any other.

Example:

  >>> import tempfile, jax, jax.numpy as jnp, optax
  >>> import spra_jax as spra
  >>> params = {'w': jnp.ones((8, 8))}
  >>> tx = spra.masked(optax.adam(1e-2), density=0.25, key=0)
  >>> state = {'params': params, 'opt_state': tx.init(params)}
  >>> with spra.checkpoint.TrainCheckpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
  ...   for step in range(1, 4):
  ...     _ = ckpt.save(step, state, data_position={'epoch': 0, 'batch': step}, rng=jax.random.key(step))
  ...   ckpt.wait_until_finished()
  ...   restored = ckpt.restore(state)
  >>> restored.step, restored.data_position, ckpt.all_steps()
  (3, {'epoch': 0, 'batch': 3}, [2, 3])
  >>> bool((jax.random.key_data(restored.rng) == jax.random.key_data(jax.random.key(3))).all())
  True
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spra_jax import _host, compact
from spra_jax._version import __version__
from spra_jax.checkpoint import _files, _format
from spra_jax.lean import LeanState
from spra_jax.masks import FROZEN, FULL, SPARSE, LeafMask, is_leaf_mask, path_str, validate
from spra_jax.delta import SparseDelta
from spra_jax.sharding.relayout import map_compact, relayout_masks
from spra_jax.transform import SparseMaskedState

__all__ = ["TrainCheckpoint", "TrainCheckpointer", "trained_entries", "with_trained_entries"]


def trained_entries(params: Any, mask: Any) -> Any:
  """The current values of ``params`` at the mask's entries (a compact tree, O(k)).

  With :func:`with_trained_entries` this stores a SpaRTA model's weights in
  O(k): everything outside the mask is the frozen base.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> trained_entries({'w': jnp.arange(4.)}, {'w': LeafMask.sparse((4,), jnp.array([1, 3], jnp.int32))})
    {'w': Array([1., 3.], dtype=float32)}
  """
  return compact.gather(params, mask)


def _write_leaf(m: LeafMask, base: Any, entries: Any) -> Any:
  if m.kind == FROZEN:
    return base
  if m.kind == FULL:
    return jnp.asarray(entries, base.dtype).reshape(m.shape)
  return compact.put(base, m, entries)  # block by block for a shard-local mask (its indices are sorted per block)


def with_trained_entries(base_params: Any, mask: Any, entries: Any) -> Any:
  """``base_params`` with the mask's entries set to ``entries`` (inverse of :func:`trained_entries`).

  The values are copied, so the result is bit-identical to the parameters
  ``entries`` were taken from wherever those equal the base outside the mask.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> m = {'w': LeafMask.sparse((4,), jnp.array([1, 3], jnp.int32))}
    >>> with_trained_entries({'w': jnp.zeros(4)}, m, {'w': jnp.array([5., 6.])})['w'].tolist()
    [0.0, 5.0, 0.0, 6.0]
  """
  validate(mask, base_params, check_indices=False)
  return compact.map_leaves(_write_leaf, mask, base_params, entries)


class TrainCheckpoint(NamedTuple):
  """What :meth:`TrainCheckpointer.restore` returns.

  Attributes:
    step: the step the checkpoint was saved at.
    state: the training state, with the structure of the ``like`` tree.
    data_position: the data position saved with it (any JSON value), or None.
    rng: the PRNG key saved with it (typed or legacy, as saved), or None.
    metadata: the JSON metadata saved with it (``{}`` if none).
  """

  step: int
  state: Any
  data_position: Any
  rng: Any
  metadata: dict[str, Any]


def _is_lean(x: Any) -> bool:
  return isinstance(x, LeanState)


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _compact_lean(state: Any) -> Any:
  def one(x: Any) -> Any:
    return x._replace(params=trained_entries(x.params, x.delta.mask)) if _is_lean(x) else x

  return jax.tree.map(one, state, is_leaf=_is_lean)


def _key_impl(x: Any) -> str:
  """The PRNG implementation's name of a typed key array or ShapeDtypeStruct ('' for other leaves)."""
  if not _is_key(x):
    return ""
  return str(jax.random.key_impl(x)) if isinstance(x, jax.Array) else x.dtype._impl.name


def _storable(state: Any) -> Any:
  """The tree Orbax writes: LeanState weights as their trained entries, typed keys as their key data."""

  def key_data(x: Any) -> Any:
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)

  return jax.tree.map(key_data, _compact_lean(state))


def _unstorable(restored: Any, like: Any) -> Any:
  """Wraps key data back into typed keys where ``like`` has them (LeanState weights stay compact)."""
  impls = jax.tree.map(_key_impl, _compact_lean(like))
  return jax.tree.map(lambda r, impl: jax.random.wrap_key_data(r, impl=impl) if impl else r, restored, impls)


def _abstract(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
  sharding = sharding if sharding is not None else getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


# The JSON entry listing the zero-size arrays of a checkpoint (Orbax refuses to write them; see the module docstring).
_EMPTY = "empty_arrays"
# The JSON entry giving the shard grid (LeafMask.blocks) of every sparse mask leaf in the saved state, in tree order.
_LAYOUTS = "mask_layouts"


def _sparse_masks(state: Any) -> list[tuple[str, LeafMask]]:
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_leaf_mask)[0]
  return [(path_str(p), m) for p, m in flat if isinstance(m, LeafMask) and m.kind == SPARSE]


def _layouts(state: Any) -> list[dict[str, Any]]:
  return [{"path": p, "k": m.num_trainable, "blocks": None if m.blocks is None else list(m.blocks)}
          for p, m in _sparse_masks(state)]


def _fitting(sharding: Any, k: int) -> Any:
  """``sharding`` for a ``[k]`` vector if it splits k evenly, else replicated on its mesh (or None)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  if k % math.prod(sharding.mesh.shape[a] for a in _spec_axes(sharding.spec)) == 0:
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _spec_axes(spec: Any) -> list[str]:
  return [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]


def _with_saved_counts(like: Any, layouts: list[dict[str, Any]]) -> Any:
  """``like`` with each sparse mask leaf, and the compact vectors that follow it, sized to the checkpoint's count.

  A state built on another mesh may hold a few more or fewer entries per leaf than the saved one (a leaf cut into
  n blocks trains ``n * round(k / n)``); its arrays become ``ShapeDtypeStruct`` of the saved sizes, so that the
  restore reads the trained mask whatever the like's own count.
  """
  records = iter(layouts)
  if len(_sparse_masks(like)) != len(layouts):
    return like  # not the checkpoint's masks: the shape checks will say where they differ

  def one(x: Any) -> Any:
    if isinstance(x, LeafMask):
      record = next(records) if x.kind == SPARSE else None
      if record is None or record["k"] == x.num_trainable:
        return x
      return LeafMask.sparse(x.shape, _sized(x.indices, record["k"]), blocks=x.blocks)
    if not isinstance(x, (LeanState, SparseMaskedState, SparseDelta)):
      return x
    mask = x.delta.mask if isinstance(x, LeanState) else x.mask
    sizes = {p: next(records)["k"] for p, _ in _sparse_masks(mask)}
    touched = {p for p, m in _sparse_masks(mask) if sizes[p] != m.num_trainable}
    return map_compact(x, touched,
                       lambda p, m: LeafMask.sparse(m.shape, _sized(m.indices, sizes[p]), blocks=m.blocks),
                       lambda p, m, v: _sized(v, sizes[p]))

  return jax.tree.map(one, like, is_leaf=lambda x: isinstance(x, (LeafMask, LeanState, SparseMaskedState,
                                                                  SparseDelta)))


def _sized(x: Any, k: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((k,), x.dtype, sharding=_fitting(getattr(x, "sharding", None), k))


def _as_saved(state: Any, layouts: list[dict[str, Any]], where: str) -> tuple[Any, dict[int, Any]]:
  """The restored ``state`` with each sparse mask leaf's grid set back to the one it was saved with.

  A restored mask takes its static grid from ``like`` but its indices from the checkpoint, so where the two grids
  differ (``like`` built on another mesh) the leaf must first say how its indices are really ordered. Returns the
  state and, per leaf object whose grid changed, the grid ``like`` asked for.
  """
  masks = _sparse_masks(state)
  if [p for p, _ in masks] != [r["path"] for r in layouts]:
    raise ValueError(f"{where}: the masks of the like tree are not the ones the checkpoint holds "
                     f"({len(masks)} sparse mask leaves in like, {len(layouts)} saved).")
  saved = {id(m): (None if r["blocks"] is None else tuple(r["blocks"])) for (_, m), r in zip(masks, layouts)}
  wanted: dict[int, Any] = {}

  def one(m: Any) -> Any:
    if not isinstance(m, LeafMask) or id(m) not in saved or saved[id(m)] == m.blocks:
      return m
    fixed = LeafMask.sparse(m.shape, m.indices, blocks=saved[id(m)])
    wanted[id(fixed)] = m.blocks
    return fixed

  return jax.tree.map(one, state, is_leaf=is_leaf_mask), wanted


def _label(key: tuple[str, ...]) -> str:
  """A stored leaf's name in messages: its path under the saved tree, e.g. ``opt_state/inner_state/0/mu/w``."""
  return "/".join(key[1:] if key and key[0] == "state" else key)


def _is_empty(x: Any) -> bool:
  shape = getattr(x, "shape", None)
  return shape is not None and math.prod(shape) == 0


def _without_empty(tree: Any) -> tuple[Any, list[dict[str, Any]]]:
  """``tree`` with its zero-size leaves replaced by None (an empty node, which Orbax stores), and their records."""
  records = [{"path": list(key), "shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}
             for key, x in ocp.tree.to_flat_dict(tree).items() if _is_empty(x)]
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree), records


def _empty_like(x: jax.ShapeDtypeStruct) -> jax.Array:
  """A zero-size array of ``x``'s shape and dtype, placed by its sharding where it has one."""
  if x.sharding is None:
    return jnp.zeros(x.shape, x.dtype)
  host = np.zeros(x.shape, x.dtype)
  return jax.make_array_from_callback(x.shape, x.sharding, lambda index: host[index])


def _join_new_threads(before: set[threading.Thread], timeout_s: float) -> None:
  """Waits (at most ``timeout_s`` in all) for the checkpointing library's non-daemon threads not in ``before``."""
  deadline = time.monotonic() + timeout_s
  for t in threading.enumerate():
    if t in before or t.daemon or t is threading.current_thread() or not type(t).__module__.startswith("orbax"):
      continue
    t.join(max(0.0, deadline - time.monotonic()))


def _check_deleted(tree: Any) -> None:
  for key, x in ocp.tree.to_flat_dict(tree).items():
    if isinstance(x, jax.Array) and x.is_deleted():
      raise ValueError(
          f"state leaf {_label(key)!r} has been deleted (donated to a jitted step?); save the state the step "
          f"returned, not the one given to it.")


class TrainCheckpointer:
  """Asynchronous, retained, resumable training checkpoints in one directory.

  Args:
    directory: the run's checkpoint directory (created if missing).
    max_to_keep: how many of the latest checkpoints to keep (None: all).
    keep_every_n_steps: also keep, for good, every checkpoint whose step is a
      multiple of this (None: none).
    save_interval_steps: :meth:`save` skips steps that are not multiples of
      this (unless ``force=True``).
    async_save: write in the background (``save`` returns once the arrays are
      copied to the host; :meth:`wait_until_finished` waits for the files).

  IMPORTANT: call :meth:`close` (or use the object as a context manager) so
  that the last asynchronous save completes before the process exits. A save
  that is interrupted leaves the earlier checkpoints intact; Orbax removes its
  unfinished temporary directory the next time the directory is opened.

  Example: see the module docstring.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      max_to_keep: int | None = 3,
      keep_every_n_steps: int | None = None,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    for name, value in (("max_to_keep", max_to_keep), ("keep_every_n_steps", keep_every_n_steps)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}.")
    self.directory = _files.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_every_n_steps,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    # The handlers named up front, so that a fresh process can read a step's metadata before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  # -- queries --------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None.

    A save still being written in the background does not count: a process
    killed now would resume from the step this returns.
    """
    steps = self.all_steps()
    if steps and self._manager.is_saving_in_progress():
      steps = steps[:-1]  # the newest step's files are still being written
    return steps[-1] if steps else None

  # -- saving ---------------------------------------------------------------

  def save(
      self,
      step: int,
      state: Any,
      *,
      data_position: Any = None,
      rng: Any = None,
      metadata: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Starts saving ``state`` as checkpoint ``step``; returns whether it saves.

    Args:
      step: the training step (an int; checkpoints are ordered by it).
      state: any pytree of arrays: params or a delta, optimizer state
        (``SparseMaskedState`` included), ``LeanState`` (stored as its trained
        entries, see the module docstring), typed PRNG keys.
      data_position: where the data stream stands (any JSON value, e.g.
        ``{'epoch': 1, 'batch': 1234}``).
      rng: a PRNG key to resume the run's randomness from.
      metadata: other JSON metadata (e.g. the config of the run).
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      True if the save started. False only where ``save_interval_steps``
      skips ``step`` (a step that is not a multiple of it, without ``force``;
      the first save of a directory always saves): that is a policy the
      caller chose, so it is not an error.

    Raises:
      TypeError: ``step`` is not an int, or ``metadata`` / ``data_position``
        hold a value with no JSON form (the message names it); raised before
        anything is written.
      ValueError: ``step`` is negative, already saved, or older than the
        latest checkpoint (checkpoints are written in increasing step order;
        Orbax would skip such a step without a word), or ``state`` holds an
        array that was deleted (donated).

    The arrays are copied to the host before ``save`` returns, so the caller
    may donate or overwrite ``state`` right away. A save that fails inside
    Orbax waits for Orbax's background work before it raises, so the
    checkpointer stays usable and the process can exit.
    """
    if isinstance(step, bool):
      raise TypeError(f"step must be an int, got {step!r}.")
    try:
      step = operator.index(step)
    except TypeError:
      raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}.") from None
    if step < 0:
      raise ValueError(f"step must be a non-negative int, got {step}.")
    steps = self.all_steps()
    if step in steps:
      raise ValueError(
          f"checkpoint step {step} already exists in {self.directory} (it has steps {steps}); save a later step.")
    if steps and step < steps[-1]:
      raise ValueError(
          f"step {step} is older than the latest checkpoint, step {steps[-1]}, in {self.directory} (it has steps "
          f"{steps}); checkpoints are saved in increasing step order. Resume from the latest one, or start the run "
          f"over in a new directory.")
    if metadata is not None and not isinstance(metadata, Mapping):
      raise TypeError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}.")
    meta = {
        "library_version": __version__,
        "data_position": _format.jsonable(data_position, "data_position"),
        "metadata": _format.jsonable(dict(metadata or {}), "metadata"),
        "rng": None,
        _LAYOUTS: _layouts(state),
    }
    tree = {"state": _storable(state)}
    if rng is not None:
      typed = _is_key(rng)
      meta["rng"] = {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None}
      # On several processes the key is host-local: saved as a replicated global array (the same on every process).
      tree["rng"] = _host.replicated(jax.random.key_data(rng) if typed else jnp.asarray(rng))
    _check_deleted(tree)
    tree, meta[_EMPTY] = _without_empty(tree)
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    before = set(threading.enumerate())
    try:
      return self._manager.save(step, args=args, force=force)
    except BaseException:
      # Orbax starts a thread that creates the step's directory before it writes the arrays; when the write fails,
      # nothing awaits that thread (the manager's wait_until_finished does not know it), and if the process exits
      # while it runs, it dies on the closed executor and the interpreter never exits. Join the threads this save
      # started, then raise the error that stopped it.
      _join_new_threads(before, timeout_s=60.0)
      with contextlib.suppress(Exception):
        self._manager.wait_until_finished()
      raise

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  # -- restoring ------------------------------------------------------------

  def restore(
      self,
      like: Any,
      *,
      step: int | None = None,
      base_params: Any = None,
      shardings: Any = None,
      cast: bool = False,
  ) -> TrainCheckpoint:
    """Restores checkpoint ``step`` (default: the latest) into ``like``'s structure.

    Args:
      like: the state as the run builds it before training (arrays or
        ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``). Its structure,
        shapes and dtypes must match the saved state; masks inside it (in a
        ``SparseMaskedState``, a ``LeanState`` or a delta) give their grid only:
        their indices, and so their number of entries, come from the checkpoint
        (a mask sampled on another mesh may hold a few more or fewer). Where
        like's grid differs from the saved one (like built on another mesh),
        each leaf is re-laid for like's grid with every compact vector that
        follows it (``spra.sharding.relayout``), so the update stays
        collective-free there; a leaf whose entries do not split evenly over
        like's blocks keeps the saved grid, with a warning naming it.
      step: which checkpoint; default the latest.
      base_params: the frozen base weights, needed when ``like`` holds a
        ``LeanState`` (its trained entries are written into a copy of them).
      shardings: one ``jax.sharding.Sharding`` for every array, or a tree with
        ``like``'s structure of them (mask indices included) (default: each ``like`` array's own sharding,
        or the default device for ``ShapeDtypeStruct`` without one). Orbax
        reshards, so a checkpoint saved on 8 devices restores onto 1 or 4.
      cast: convert stored arrays to the dtypes of ``like`` where they differ
        (e.g. float32 masters into a bfloat16 evaluation state). Off by
        default, since a silent conversion loses the bit-exact resume.

    Raises:
      FileNotFoundError: no checkpoint in the directory (or not ``step``).
      ValueError: ``like`` holds a ``LeanState`` and ``base_params`` is missing;
        or ``like`` does not fit the checkpoint: a leaf it lacks or has
        besides, another shape, or (without ``cast``) another dtype; the
        message names the leaf, what is stored and what ``like`` asks for.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}.")
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; it has steps {steps}.")
    step = int(step)
    has_lean = any(_is_lean(x) for x in jax.tree.leaves(like, is_leaf=_is_lean))
    if has_lean and base_params is None:
      raise ValueError(
          "like holds a LeanState, whose weights are checkpointed as the trained entries only; pass "
          "base_params= (the frozen base weights) to rebuild them."
      )

    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get(_LAYOUTS) is not None:
      like = _with_saved_counts(like, meta[_LAYOUTS])
    if shardings is None:
      abstract_state = jax.tree.map(_abstract, like)
    elif isinstance(shardings, jax.sharding.Sharding):
      abstract_state = jax.tree.map(lambda x: _abstract(x, shardings), like)
    else:
      abstract_state = jax.tree.map(_abstract, like, shardings)
    abstract = {"state": _storable(abstract_state)}
    rng_info = meta.get("rng")
    if rng_info is not None:
      if rng_info["typed"]:
        data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_info["impl"])))
      else:
        data = jax.eval_shape(lambda: jax.random.PRNGKey(0))
      # Restored replicated over every device (on several processes, a global array like the one saved).
      abstract["rng"] = jax.ShapeDtypeStruct(data.shape, data.dtype,
                                             sharding=_host.replicated_sharding() if _host.multiprocess() else None)
    self._check_fits(step, abstract, meta.get(_EMPTY) or [], cast=cast)
    leaves, treedef = jax.tree.flatten(abstract)
    to_read = treedef.unflatten([None if _is_empty(x) else x for x in leaves])
    try:
      read = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(to_read))
      ).state
    except ValueError as e:
      raise ValueError(f"checkpoint {step} in {self.directory} does not fit the like tree: {e}") from e
    # flatten_up_to takes the None that stands for a zero-size leaf as that leaf.
    tree = treedef.unflatten([_empty_like(x) if _is_empty(x) else r
                              for x, r in zip(leaves, treedef.flatten_up_to(read))])

    state = _unstorable(tree["state"], abstract_state)
    where = f"checkpoint {step} in {self.directory}"
    wanted = {}
    if meta.get(_LAYOUTS) is not None:  # (older checkpoints record none: like's grid is assumed)
      state, wanted = _as_saved(state, meta[_LAYOUTS], where)
    if has_lean:
      state = jax.tree.map(
          lambda x: x._replace(params=with_trained_entries(base_params, x.delta.mask, x.params)) if _is_lean(x) else x,
          state,
          is_leaf=_is_lean,
      )
    if wanted:
      # Saved on another shard grid: the same entries re-laid for like's grid, with every compact vector that
      # follows them, so that the update stays collective-free on the new mesh (or, where the entries do not
      # split evenly over the new blocks, kept as saved, with a warning).
      state = relayout_masks(state, lambda path, m: wanted.get(id(m), m.blocks), where=where)
    rng = None
    if rng_info is not None:
      rng = jax.random.wrap_key_data(tree["rng"], impl=rng_info["impl"]) if rng_info["typed"] else tree["rng"]
    return TrainCheckpoint(step, state, meta.get("data_position"), rng, meta.get("metadata") or {})

  def _check_fits(self, step: int, abstract: Any, empty: list[Any], *, cast: bool) -> None:
    """Compares the tree ``restore`` asks for with what checkpoint ``step`` stores: names, shapes, dtypes."""
    stored: dict[tuple[str, ...], tuple[tuple[int, ...], str]] = {}
    try:
      items = self._manager.item_metadata(step)["state"]
      items = ocp.tree.to_flat_dict(items.tree if hasattr(items, "tree") else items)
    except Exception:  # no usable metadata (an unusual Orbax layout): Orbax's own checks remain
      items = None
    if not items:
      return
    for key, info in items.items():
      if hasattr(info, "shape") and hasattr(info, "dtype"):
        stored[tuple(key)] = (tuple(int(d) for d in info.shape), np.dtype(info.dtype).name)
    for record in empty:
      stored[tuple(record["path"])] = (tuple(record["shape"]), record["dtype"])
    wanted = {tuple(key): (tuple(int(d) for d in x.shape), np.dtype(x.dtype).name)
              for key, x in ocp.tree.to_flat_dict(abstract).items()}
    where = f"checkpoint {step} in {self.directory}"
    lacks = [_label(k) for k in stored if k not in wanted]
    extra = [_label(k) for k in wanted if k not in stored]
    if lacks or extra:
      detail = []
      if extra:
        detail.append(f"like has leaves the checkpoint does not: {extra[:6]}")
      if lacks:
        detail.append(f"like lacks leaves the checkpoint has: {lacks[:6]}")
      raise ValueError(f"{where} does not fit the like tree; " + "; ".join(detail) + ".")
    for key, (shape, dtype) in wanted.items():
      stored_shape, stored_dtype = stored[key]
      if shape != stored_shape:
        raise ValueError(
            f"{where} does not fit the like tree: {_label(key)!r} is stored with shape {stored_shape}, like has "
            f"{shape}.")
      if dtype != stored_dtype and not cast:
        raise ValueError(
            f"{where} does not fit the like tree: {_label(key)!r} is stored as {stored_dtype}, like asks for "
            f"{dtype}; give a like of the stored dtype, or pass cast=True to convert it.")

  # -- lifetime -------------------------------------------------------------

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"TrainCheckpointer({str(self.directory)!r}, steps={self.all_steps()})"
