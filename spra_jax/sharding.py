"""Sharded SpaRTA training on device meshes, with JAX's own SPMD engine.

Parameters are laid out on a mesh with axes ``data`` (batch), ``fsdp`` (batch,
and parameters split along one dimension) and ``tensor`` (parameters split the
Megatron way) by *partition rules*: ``(path regex, PartitionSpec)`` pairs,
first match wins, matched with ``re.search`` against each leaf's '/'-joined
path (:func:`spra.masks.path_str`). Everything SpaRTA adds to a step is then
given a sharding that follows the parameters':

* the mask of a sharded leaf is *shard-local* (:func:`spra.sample_mask` does it
  by itself for sharded leaves, and so does ``spra.masked(..., key=...)``
  initialised on sharded parameters): its k indices are k / n per shard block,
  and the compact ``[k]`` vectors (indices, AdamW moments, delta values) are
  sharded ``P((axes of the leaf's spec...))``, so that each device's slice
  refers only to entries of its own shard of the parameter
  (:func:`spra.masks.compact_sharding`). Gathering gradients at the mask,
  running the optimizer and scattering the update back then need no
  communication at all;
* :func:`mask_shardings`, :func:`delta_shardings`, :func:`opt_state_shardings`
  and :func:`lean_state_shardings` give the ``NamedSharding`` of every leaf of
  those trees, consistent with :func:`param_shardings`;
* :func:`sharded_train_step` (dense gradient + any Optax transformation, e.g.
  ``spra.masked``) and :func:`sharded_lean_step` (the lean path) are jitted,
  donated steps whose outputs keep the inputs' shardings, step after step.

Exact k and rounding: a sharded compact vector splits into equal slices, so a
leaf cut into n blocks trains ``n * round(k / n)`` entries (at least n), exactly
that many, ``round(k / n)`` in every block; the count differs from the
unsharded budget by at most n / 2 per leaf. Sampling is stratified (equal
counts in equal blocks), so every entry keeps the marginal probability k / size.
Indices stay unique int32 flat positions; they are globally sorted when the
blocks are contiguous ranges (only the leading dimension split), and sorted per
block otherwise (block-major, see :class:`spra.LeafMask`). A mask records its
grid (``LeafMask.blocks``), which is static metadata: restore a checkpointed
mask into a target built from a tree with the same grid (the saved state's own
structure, mapped to ``jax.ShapeDtypeStruct`` with the new shardings).

Multi-host (TPU pods, multi-node GPU): start every process with
``jax.distributed.initialize()`` (on Cloud TPU it finds the coordinator by
itself; elsewhere pass ``coordinator_address``, ``num_processes`` and
``process_id``) before any other JAX call, then build the mesh over
``jax.devices()`` (all hosts' devices) with :func:`make_mesh`. Each leaf's key
is ``fold_in(key, stable_hash(path))`` and each block's ``fold_in(leaf_key,
j)``, so every host samples the same mask with no communication: sampling
runs on each host's default device, and each host then fills in its own
devices' slices of the compact index vectors (``jax.make_array_from_callback``).
Batches on several hosts are built the same way (or with
``jax.make_array_from_process_local_data``).

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> import spra_jax as spra
  >>> mesh = spra.sharding.make_mesh()            # every device on the data axis
  >>> params = {'model': {'layers': [{'mlp': {'up_proj': {'kernel': jnp.ones((16, 32))}}}]}}
  >>> params = spra.sharding.shard_params(params, mesh)
  >>> tx = spra.masked(optax.adam(1e-2), density=0.25, key=jax.random.key(0))
  >>> opt_state = tx.init(params)
  >>> shardings = spra.sharding.param_shardings(params, mesh)
  >>> opt_state = jax.device_put(opt_state, spra.sharding.opt_state_shardings(opt_state, shardings))
  >>> loss_fn = lambda p, x: ((x @ p['model']['layers'][0]['mlp']['up_proj']['kernel']) ** 2).mean()
  >>> step = spra.sharding.sharded_train_step(loss_fn, tx, param_shardings=shardings,
  ...     opt_state_shardings=spra.sharding.opt_state_shardings(opt_state, shardings),
  ...     batch_shardings=spra.sharding.batch_sharding(mesh, 2))
  >>> params, opt_state, loss = step(params, opt_state, jnp.ones((8, 16)))
  >>> float(jax.block_until_ready(loss)) > 0
  True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spra_jax import compact
from spra_jax.delta import SparseDelta
from spra_jax.lean import LeanState, LeanStep
from spra_jax.masks import (
    FROZEN,
    FULL,
    LeafMask,
    block_grid,
    compact_sharding,
    is_leaf_mask,
    path_str,
)
from spra_jax.transform import SparseMaskedState

__all__ = [
    "AXES",
    "LLAMA_RULES",
    "BERT_RULES",
    "DEFAULT_RULES",
    "make_mesh",
    "batch_sharding",
    "partition_specs",
    "param_shardings",
    "shard_params",
    "compact_sharding",
    "mask_shardings",
    "delta_shardings",
    "opt_state_shardings",
    "lean_state_shardings",
    "check_shard_local",
    "sharded_train_step",
    "sharded_lean_step",
    "ShardedTrainStep",
    "ShardedLeanStep",
    "count_collectives",
    "COLLECTIVES",
]

AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, P]]

# Megatron-style tensor parallelism: column-parallel input projections (output
# features on `tensor`), row-parallel output projections (input features on
# `tensor`), so that each attention or MLP block needs one all-reduce of
# activations; `fsdp` splits the other dimension of every matrix. Norms are
# replicated. Kernels are stored [in, out].
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"(input_layernorm|post_attention_layernorm|norm)/scale$", P()),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    (r"(^|/)score/kernel$", P("fsdp", None)),
)

BERT_RULES: tuple[tuple[str, P], ...] = (
    (r"embeddings/(word|position|token_type)_embeddings/embedding$", P("tensor", "fsdp")),
    (r"attention/self/(query|key|value)/kernel$", P("fsdp", "tensor")),
    (r"attention/self/(query|key|value)/bias$", P("tensor")),
    (r"attention/output/dense/kernel$", P("tensor", "fsdp")),
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate/dense/bias$", P("tensor")),
    (r"layer/\d+/output/dense/kernel$", P("tensor", "fsdp")),
    (r"LayerNorm/(scale|bias)$", P()),
    (r"pooler/dense/kernel$", P("fsdp", "tensor")),
    (r"pooler/dense/bias$", P("tensor")),
    (r"(^|/)classifier/kernel$", P("fsdp", None)),
)

# Anything unmatched (biases of row-parallel layers, heads' biases, buffers) is replicated.
DEFAULT_RULES: tuple[tuple[str, P], ...] = LLAMA_RULES + BERT_RULES

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# --------------------------------------------------------------------------
# Meshes and parameter shardings.
# --------------------------------------------------------------------------


def make_mesh(*, data: int | None = None, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of them).

  ``data`` defaults to the devices left over by ``fsdp * tensor``. The axes are
  ``AxisType.Auto`` (classic GSPMD: shardings propagate through ``jax.jit``).
  Devices are laid out by ``jax.make_mesh``'s rules (the fastest links on the
  innermost, ``tensor`` axis) when all devices are used, in the given order otherwise.

  Args:
    data: devices along the batch axis.
    fsdp: devices along the fully sharded axis (batch, and one dimension of each matrix).
    tensor: devices along the tensor-parallel axis.
    devices: the devices to use; ``data * fsdp * tensor`` of them.

  Raises:
    ValueError: if the sizes do not multiply to the number of devices.

  Example:

    >>> mesh = make_mesh()
    >>> mesh.axis_names, mesh.shape['data'] == len(jax.devices())
    (('data', 'fsdp', 'tensor'), True)
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} must be a positive int, got {size!r}.")
  if data is None:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"fsdp * tensor = {fsdp * tensor} does not divide the {len(devices)} devices.")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
        f"but {len(devices)} were given."
    )
  shape = (data, fsdp, tensor)
  if len(devices) == len(jax.devices()) and set(devices) == set(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays split along their first dimension over ``data`` and ``fsdp``.

  Example:

    >>> batch_sharding(make_mesh(), 2).spec
    P(('data', 'fsdp'), None)
  """
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh | None, path: str) -> P:
  """Pads ``spec`` to the leaf's rank; drops mesh axes that do not divide their dimension."""
  entries = list(spec)
  if len(entries) > len(shape):
    raise ValueError(f"partition rule {spec} has {len(entries)} entries, but leaf {path!r} has shape {shape}.")
  entries += [None] * (len(shape) - len(entries))
  if mesh is None:
    return P(*entries)
  fitted = []
  for size, entry in zip(shape, entries):
    axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    for axis in axes:
      if axis not in mesh.shape:
        raise ValueError(f"partition rule for {path!r} names mesh axis {axis!r}; the mesh has {mesh.axis_names}.")
    # Keep the longest prefix of axes whose product divides the dimension: uneven
    # shards would be padded, and a padded leaf cannot be split into equal blocks.
    kept: list[str] = []
    for axis in axes:
      if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        break
      kept.append(axis)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def partition_specs(params: Any, rules: Rules = DEFAULT_RULES, *, mesh: Mesh | None = None) -> Any:
  """The ``PartitionSpec`` of every leaf of ``params`` under path-regex ``rules``.

  The first rule whose regex ``re.search``-es the leaf's path wins; unmatched
  leaves are replicated (``P()``). With a ``mesh``, mesh axes that do not
  divide a dimension are dropped from it (that dimension is then replicated
  over them), so one rule set fits every model size.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``nnx.state(model)``).
    rules: ``(regex, PartitionSpec)`` pairs; see :data:`DEFAULT_RULES`.
    mesh: the mesh, to check axis names and divisibility.

  Example:

    >>> params = {'model': {'layers': [{'self_attn': {'q_proj': {'kernel': jnp.zeros((64, 64))}}}],
    ...                     'norm': {'scale': jnp.ones(64)}}}
    >>> specs = partition_specs(params)
    >>> specs['model']['layers'][0]['self_attn']['q_proj']['kernel'], specs['model']['norm']['scale']
    (P('fsdp', 'tensor'), P(None,))
  """
  compiled = [(re.compile(r), spec) for r, spec in rules]

  def one(path, leaf):
    p = path_str(path)
    shape = tuple(np.shape(leaf))
    for regex, spec in compiled:
      if regex.search(p):
        return _fit_spec(spec, shape, mesh, p)
    return P(*([None] * len(shape)))

  return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """``NamedSharding`` per leaf of ``params`` on ``mesh`` (see :func:`partition_specs`).

  Example:

    >>> shardings = param_shardings({'lm_head': {'kernel': jnp.zeros((8, 16))}}, make_mesh())
    >>> shardings['lm_head']['kernel'].spec
    P('fsdp', 'tensor')
  """
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(params, rules, mesh=mesh),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """``params`` placed on ``mesh`` by ``rules`` (``jax.device_put``).

  Example:

    >>> p = shard_params({'w': jnp.ones((4, 4))}, make_mesh())
    >>> p['w'].sharding.spec
    P(None, None)
  """
  return jax.device_put(params, param_shardings(params, mesh, rules))


# --------------------------------------------------------------------------
# Shardings of masks, deltas and optimizer states.
# --------------------------------------------------------------------------


def _replicated_like(sharding: NamedSharding) -> NamedSharding:
  return NamedSharding(sharding.mesh, P())


def _compact_leaf_sharding(m: LeafMask, sharding: NamedSharding) -> NamedSharding | None:
  """The sharding of a leaf's compact values: the parameter's for a full leaf, compact for sparse."""
  if m.kind == FROZEN:
    return None
  if m.kind == FULL:
    return sharding
  if m.blocks is not None and m.blocks == block_grid(m.shape, sharding):
    return compact_sharding(sharding)
  # Not stratified for this sharding (or not split): the compact vector is replicated;
  # the step is still correct, but the optimizer's gathers then communicate.
  return _replicated_like(sharding)


def _check_structure(mask: Any, shardings: Any) -> None:
  mask_def = jax.tree.structure(mask, is_leaf=is_leaf_mask)
  if jax.tree.structure(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)) != mask_def:
    raise ValueError("param_shardings must have the structure of the parameters the mask was sampled on.")


def mask_shardings(mask: Any, param_shardings: Any) -> Any:
  """The mask tree with each sparse leaf's indices replaced by their ``NamedSharding``.

  Shard-local leaves whose grid matches their parameter's sharding get
  :func:`compact_sharding`; other sparse leaves' indices are replicated.

  Example:

    >>> mesh = make_mesh()
    >>> mask = {'w': LeafMask.sparse((4, 4), jnp.array([1, 5], jnp.int32))}
    >>> mask_shardings(mask, {'w': NamedSharding(mesh, P())})['w'].indices.spec
    P()
  """
  _check_structure(mask, param_shardings)

  def one(m: LeafMask, s: NamedSharding):
    indices = _compact_leaf_sharding(m, s) if m.kind not in (FULL, FROZEN) else None
    return LeafMask(m.kind, m.shape, indices, m.blocks)

  return compact.map_leaves(one, mask, param_shardings)


def _values_shardings(mask: Any, param_shardings: Any) -> Any:
  return compact.map_leaves(_compact_leaf_sharding, mask, param_shardings)


def delta_shardings(delta: SparseDelta, param_shardings: Any) -> SparseDelta:
  """A ``SparseDelta`` of shardings for ``delta``: indices and values sharded alike.

  Example:

    >>> import spra_jax as spra
    >>> mesh = make_mesh()
    >>> delta = spra.init_delta({'w': LeafMask.full((4, 4))})
    >>> delta_shardings(delta, {'w': NamedSharding(mesh, P(None, 'tensor'))}).values['w'].spec
    P(None, 'tensor')
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"delta_shardings expects a SparseDelta, got {type(delta).__name__}.")
  return SparseDelta(mask_shardings(delta.mask, param_shardings), _values_shardings(delta.mask, param_shardings))


def _is_sharding(x: Any) -> bool:
  return isinstance(x, NamedSharding)


def _mesh_of(param_shardings: Any) -> Mesh:
  leaves = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
  if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
    raise TypeError("param_shardings must be a non-empty pytree of NamedSharding (see spra.sharding.param_shardings).")
  return leaves[0].mesh


def _suffix_finder(entries: list[tuple[str, tuple[int, ...], Any]]) -> Callable[[str, tuple[int, ...]], Any]:
  """For a state leaf's path and shape, the sharding of the entry whose path is its longest '/'-suffix."""
  by_path = {p: (shape, s) for p, shape, s in entries}

  def find(path: str, shape: tuple[int, ...]):
    parts = path.split("/")
    for start in range(len(parts)):
      hit = by_path.get("/".join(parts[start:]))
      if hit is not None and hit[0] == shape and hit[1] is not None:
        return hit[1]
    return None

  return find


def _map_state(state: Any, find: Callable, replicated: NamedSharding) -> Any:
  def one(path, leaf):
    found = find(path_str(path), tuple(np.shape(leaf)))
    return found if found is not None else replicated

  return jax.tree_util.tree_map_with_path(one, state)


def _compact_entries(mask: Any, param_shardings: Any) -> list[tuple[str, tuple[int, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]
  shardings = jax.tree.structure(mask, is_leaf=is_leaf_mask).flatten_up_to(_values_shardings(mask, param_shardings))
  out = []
  for (p, m), s in zip(flat, shardings):
    out.append((path_str(p), m.shape if m.kind == FULL else (m.num_trainable,), s))
  return out


def opt_state_shardings(opt_state: Any, param_shardings: Any, params: Any = None) -> Any:
  """``NamedSharding`` per leaf of an Optax state, ``spra.masked`` states included.

  Inside a :class:`spra.SparseMaskedState`, the mask gets :func:`mask_shardings`
  and each inner-state leaf whose path ends with a parameter's path and has
  that leaf's compact shape gets the compact sharding (AdamW's ``mu``/``nu``).
  Outside, leaves whose path ends with a parameter's path and that have its
  shape get the parameter's sharding (dense AdamW of full fine-tuning; give
  ``params`` for their shapes, or a ``spra.masked`` state in the tree gives
  them). Everything else (step counts, scalars) is replicated.

  Args:
    opt_state: the optimizer state (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings: the parameters' shardings (:func:`param_shardings`).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``), for their shapes.

  Example:

    >>> import optax
    >>> mesh = make_mesh()
    >>> params = {'w': jnp.zeros((8, 4))}
    >>> shardings = {'w': NamedSharding(mesh, P(None, 'tensor'))}
    >>> state = optax.adam(1e-3).init(params)
    >>> out = opt_state_shardings(state, shardings, params)
    >>> out[0].mu['w'].spec, out[0].count.spec
    (P(None, 'tensor'), P())
  """
  mesh = _mesh_of(param_shardings)
  replicated = NamedSharding(mesh, P())
  is_sms = lambda x: isinstance(x, SparseMaskedState)  # noqa: E731
  masked_states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sms) if is_sms(x)]
  if params is None and masked_states:
    params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, jnp.float32), masked_states[0].mask,
                          is_leaf=is_leaf_mask)
  entries = []
  if params is not None:
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
    if len(flat_p) != len(flat_s):
      raise ValueError(f"params has {len(flat_p)} leaves but param_shardings has {len(flat_s)}.")
    entries = [(path_str(p), tuple(np.shape(x)), s) for (p, x), s in zip(flat_p, flat_s)]
  find_param = _suffix_finder(entries)

  def one(path, sub):
    if is_sms(sub):
      _check_structure(sub.mask, param_shardings)
      inner = _map_state(sub.inner_state, _suffix_finder(_compact_entries(sub.mask, param_shardings)), replicated)
      return SparseMaskedState(mask_shardings(sub.mask, param_shardings), inner)
    found = find_param(path_str(path), tuple(np.shape(sub)))
    return found if found is not None else replicated

  return jax.tree_util.tree_map_with_path(one, opt_state, is_leaf=is_sms)


def lean_state_shardings(state: LeanState, param_shardings: Any) -> LeanState:
  """``NamedSharding`` per leaf of a :class:`spra.LeanState` (weights, delta, optimizer state, pending update).

  Example:

    >>> import optax, spra_jax as spra
    >>> mesh = make_mesh()
    >>> params = {'w': jnp.ones((8, 4))}
    >>> step = spra.lean_step(lambda p: p['w'].sum(), optax.adam(1e-3), jit=False)
    >>> state = step.init(params, spra.sample_mask(0, params, density=0.5))
    >>> lean_state_shardings(state, {'w': NamedSharding(mesh, P())}).opt_state[0].mu['w'].spec
    P()
  """
  if not isinstance(state, LeanState):
    raise TypeError(f"lean_state_shardings expects a spra.LeanState, got {type(state).__name__}.")
  mesh = _mesh_of(param_shardings)
  replicated = NamedSharding(mesh, P())
  mask = state.delta.mask
  values = _values_shardings(mask, param_shardings)
  return LeanState(
      params=param_shardings,
      delta=delta_shardings(state.delta, param_shardings),
      opt_state=_map_state(state.opt_state, _suffix_finder(_compact_entries(mask, param_shardings)), replicated),
      pending=values,
      step=replicated,
  )


def check_shard_local(mask: Any, param_shardings: Any) -> None:
  """Raises ``ValueError`` unless every sparse leaf split by its sharding is shard-local to it.

  Checks that each such leaf's grid (``LeafMask.blocks``) is its sharding's
  block grid and that slice j of the (concrete) indices lies in block j, with
  the same count per block. Leaves that their sharding does not split pass.

  Example:

    >>> mesh = make_mesh()
    >>> check_shard_local({'w': LeafMask.sparse((4,), jnp.array([0, 2], jnp.int32))}, {'w': NamedSharding(mesh, P())})
  """
  from spra_jax.masks import validate_indices as _validate_indices  # the per-slice checks live with the mask format

  _check_structure(mask, param_shardings)
  flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]
  shardings = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
  for (p, m), s in zip(flat, shardings):
    if m.kind != "sparse":
      continue
    grid = block_grid(m.shape, s)
    if grid is None:
      continue
    if m.blocks != grid:
      raise ValueError(
          f"mask leaf {path_str(p)!r} has blocks {m.blocks}, but its sharding {s.spec} splits it into {grid}; "
          "sample the mask on the sharded parameters (spra.sample_mask / spra.masked init)."
      )
    _validate_indices(path_str(p), m, check_values=True)


# --------------------------------------------------------------------------
# Jitted, donated train steps.
# --------------------------------------------------------------------------


def sharded_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    param_shardings: Any,
    opt_state_shardings: Any,
    batch_shardings: Any,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable:
  """A jitted step ``(params, opt_state, *batch) -> (params, opt_state, loss[, aux])``.

  Dense ``jax.value_and_grad`` of ``loss_fn(params, *batch)``, then
  ``tx.update`` and ``optax.apply_updates``: use it with ``spra.masked`` (or any
  Optax transformation, e.g. for full fine-tuning). Parameters and optimizer
  state are donated and come back with exactly the shardings they went in with
  (``out_shardings`` = ``in_shardings``), so nothing is resharded between steps.
  The loss (and aux) are replicated.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
    tx: the Optax transformation.
    param_shardings: from :func:`param_shardings`.
    opt_state_shardings: from :func:`opt_state_shardings`.
    batch_shardings: one sharding for every batch argument, or a tuple with one per argument.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state``.

  Example:

    >>> import optax, spra_jax as spra
    >>> mesh = make_mesh()
    >>> params = shard_params({'w': jnp.ones((8, 4))}, mesh)
    >>> tx = spra.masked(optax.sgd(0.1), density=0.5, key=0)
    >>> state = tx.init(params)
    >>> ps = param_shardings(params, mesh)
    >>> ss = opt_state_shardings(state, ps)
    >>> step = sharded_train_step(lambda p, x: (x @ p['w']).sum(), tx, param_shardings=ps,
    ...                           opt_state_shardings=ss, batch_shardings=batch_sharding(mesh))
    >>> params, state, loss = step(params, jax.device_put(state, ss), jnp.ones((4, 8)))
    >>> float(jax.block_until_ready(loss))
    128.0
  """
  return ShardedTrainStep(loss_fn, tx, param_shardings=param_shardings, opt_state_shardings=opt_state_shardings,
                          batch_shardings=batch_shardings, has_aux=has_aux, donate=donate)


class ShardedTrainStep:
  """The step :func:`sharded_train_step` builds; call it, or :meth:`lower` it to read its HLO."""

  def __init__(self, loss_fn: Callable, tx: optax.GradientTransformation, *, param_shardings: Any,
               opt_state_shardings: Any, batch_shardings: Any, has_aux: bool, donate: bool):
    self.loss_fn, self.tx, self.has_aux, self.donate = loss_fn, tx, has_aux, donate
    self.param_shardings, self.opt_state_shardings = param_shardings, opt_state_shardings
    self.batch_shardings = batch_shardings
    self._replicated = NamedSharding(_mesh_of(param_shardings), P())
    self._jitted: dict[int, Callable] = {}

  def _step(self, params, opt_state, *batch):
    out, grads = jax.value_and_grad(self.loss_fn, has_aux=self.has_aux)(params, *batch)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, *out) if self.has_aux else (params, opt_state, out)

  def _for(self, n: int) -> Callable:
    if n not in self._jitted:
      bs = self.batch_shardings
      bs = tuple(bs) if isinstance(bs, (tuple, list)) else (bs,) * n
      if len(bs) != n:
        raise ValueError(f"batch_shardings has {len(bs)} entries for {n} batch arguments.")
      outs = (self.param_shardings, self.opt_state_shardings, self._replicated)
      outs += (self._replicated,) if self.has_aux else ()
      self._jitted[n] = jax.jit(self._step, in_shardings=(self.param_shardings, self.opt_state_shardings, *bs),
                                out_shardings=outs, donate_argnums=(0, 1) if self.donate else ())
    return self._jitted[n]

  def __call__(self, params: Any, opt_state: Any, *batch: Any):
    """One step: ``(params, opt_state, loss)`` (plus ``aux`` with ``has_aux``); the inputs are donated."""
    return self._for(len(batch))(params, opt_state, *batch)

  def lower(self, params: Any, opt_state: Any, *batch: Any):
    """The lowered step (``.compile().as_text()`` gives its HLO); runs nothing."""
    return self._for(len(batch)).lower(params, opt_state, *batch)


class ShardedLeanStep(LeanStep):
  """A :class:`spra.LeanStep` whose state stays on the parameters' shardings.

  :meth:`init` takes sharded parameters (``jax.Array`` with ``NamedSharding``),
  samples nothing itself (give it a mask sampled on the sharded parameters,
  which is then shard-local), and places the delta, optimizer state and
  pending update by :func:`lean_state_shardings`; each step and :meth:`flush`
  constrain their output state to the same shardings, so the donated buffers
  are reused in place and nothing is resharded between steps.
  """

  _state_shardings: Any = None

  def init(self, params: Any, mask_or_delta: Any, *, dtype: Any = jnp.float32) -> LeanState:
    """Like :meth:`spra.LeanStep.init`, then places the state on :func:`lean_state_shardings`.

    ``params`` must be ``jax.Array`` s with a ``NamedSharding`` (e.g. from :func:`shard_params`).
    """
    shardings = jax.tree.map(lambda x: x.sharding, params)
    for s in jax.tree.leaves(shardings, is_leaf=_is_sharding):
      if not isinstance(s, NamedSharding):
        raise TypeError(f"sharded_lean_step needs parameters placed with a NamedSharding, got {type(s).__name__}.")
    state = super().init(params, mask_or_delta, dtype=dtype)
    self._state_shardings = lean_state_shardings(state, shardings)
    return jax.device_put(state, self._state_shardings)

  def _constrain(self, state: LeanState) -> LeanState:
    if self._state_shardings is None:
      raise ValueError("call step.init(params, mask) before stepping: it fixes the state's shardings.")
    return jax.lax.with_sharding_constraint(state, self._state_shardings)

  def _step_impl(self, state: LeanState, *batch: Any):
    new_state, *rest = super()._step_impl(state, *batch)
    return (self._constrain(new_state), *rest)

  def _flush_impl(self, state: LeanState) -> LeanState:
    return self._constrain(super()._flush_impl(state))

  def lower(self, state: LeanState, *batch: Any):
    """The lowered step for ``state`` and ``batch`` (for HLO inspection); runs nothing."""
    return self._step.lower(state, *batch)


def sharded_lean_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> ShardedLeanStep:
  """The lean path (:func:`spra.lean_step`) on sharded parameters.

  Example:

    >>> import optax, spra_jax as spra
    >>> mesh = make_mesh()
    >>> params = shard_params({'w': jnp.ones((8, 4))}, mesh)
    >>> mask = spra.sample_mask(0, params, density=0.5)
    >>> step = sharded_lean_step(lambda p, x: (x @ p['w']).sum(), optax.sgd(0.1))
    >>> state = step.init(params, mask)
    >>> state, loss = step(state, jax.device_put(jnp.ones((4, 8)), batch_sharding(mesh)))
    >>> float(jax.block_until_ready(loss))
    128.0
  """
  return ShardedLeanStep(loss_fn, tx, has_aux=has_aux, donate=donate, jit=True)


# --------------------------------------------------------------------------
# Counting collectives in compiled HLO.
# --------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


def count_collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collectives of a compiled HLO module: one dict per op with ``op``, ``bytes`` and ``shape``.

  Reads ``compiled.as_text()``; ``bytes`` is the size of the op's result per
  device (the ``-start`` half of async pairs is counted, ``-done`` is not).

  Example:

    >>> count_collectives('  %ar = f32[128,4]{1,0} all-reduce(f32[128,4]{1,0} %x), replica_groups={}')
    [{'op': 'all-reduce', 'bytes': 2048, 'shape': 'f32[128,4]'}]
  """
  out = []
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    nbytes, shapes = 0, []
    for dtype, dims in _SHAPE.findall(match.group(1)):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      nbytes += size * _DTYPE_BYTES[dtype]
      shapes.append(f"{dtype}[{dims}]")
    if match.group(3) and len(shapes) > 1:
      # Async start ops return (operands..., results...): count the results only.
      half = len(shapes) // 2
      nbytes = sum(math.prod(int(d) for d in s[s.index("[") + 1:-1].split(",") if d) * _DTYPE_BYTES[s[:s.index("[")]]
                   for s in shapes[half:])
      shapes = shapes[half:]
    out.append({"op": match.group(2), "bytes": nbytes, "shape": " ".join(shapes)})
  return out
