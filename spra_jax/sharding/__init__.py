"""Sharded SpaRTA training on device meshes, with JAX's own SPMD engine.

Parameters are laid out on a mesh with axes ``data`` (batch), ``fsdp`` (batch,
and parameters split along one dimension) and ``tensor`` (parameters split the
Megatron way) by *partition rules*: ``(path regex, PartitionSpec)`` pairs,
first match wins, matched with ``re.search`` against each leaf's '/'-joined
path (:func:`spra.masks.path_str`); leaves no rule matches are replicated.
This package knows no model: the rules of a model family come with the model
(``spra.models.partition.rules_for('llama')``), and every function that lays
out parameters takes them. Everything SpaRTA adds to a step is then given a
sharding that follows the parameters':

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
grid (``LeafMask.blocks``), which is static metadata. On another mesh,
:func:`relayout` re-lays a mask and every compact vector that follows it for
the new grid (``TrainCheckpointer.restore`` does it by itself when the target
state was built on the new mesh), so the update stays collective-free there;
a leaf whose entries do not fall evenly into the new blocks keeps its layout
(correct, but its gathers communicate), or is refused with ``strict=True``.

Multi-host (TPU pods, multi-node GPU): start every process with
``jax.distributed.initialize()`` (on Cloud TPU it finds the coordinator by
itself; elsewhere pass ``coordinator_address``, ``num_processes`` and
``process_id``) before any other JAX call, then build the mesh over
``jax.devices()`` (all hosts' devices) with :func:`make_mesh`. Each leaf's key
is ``fold_in(key, stable_hash(path))`` and each block's ``fold_in(leaf_key,
j)``, so every host samples the same mask with no communication: sampling
runs on each host's default device, and each host then fills in its own
devices' slices of the compact index vectors (``jax.make_array_from_callback``).
Batches on several hosts are built from each host's own rows:
:func:`process_rows` names the rows of a global batch a host's devices hold,
and ``jax.make_array_from_process_local_data`` makes the global batch of them.

Modules: :mod:`~spra_jax.sharding.mesh` (the mesh and batch splits),
:mod:`~spra_jax.sharding.rules` (partition-rule machinery),
:mod:`~spra_jax.sharding.state` (shardings of masks, deltas and optimizer
states), :mod:`~spra_jax.sharding.relayout` (masks re-laid for another mesh)
and :mod:`~spra_jax.sharding.steps` (the sharded steps); every public name is here, as ``spra.sharding.<name>``.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from jax.sharding import PartitionSpec as P
  >>> import spra_jax as spra
  >>> mesh = spra.sharding.make_mesh()            # every device on the data axis
  >>> params = {'model': {'layers': [{'mlp': {'up_proj': {'kernel': jnp.ones((16, 32))}}}]}}
  >>> rules = [(r'up_proj/kernel$', P('fsdp', 'tensor'))]  # or spra.models.partition.rules_for('llama')
  >>> params = spra.sharding.shard_params(params, mesh, rules)
  >>> tx = spra.masked(optax.adam(1e-2), density=0.25, key=jax.random.key(0))
  >>> opt_state = tx.init(params)
  >>> shardings = spra.sharding.param_shardings(params, mesh, rules)
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

from spra_jax._host import process_rows
from spra_jax.sharding.mesh import AXES, batch_sharding, make_mesh
from spra_jax.sharding.relayout import relayout
from spra_jax.sharding.rules import Rules, param_shardings, partition_specs, shard_params
from spra_jax.sharding.state import (
    check_shard_local,
    compact_sharding,
    delta_shardings,
    lean_state_shardings,
    mask_shardings,
    opt_state_shardings,
)
from spra_jax.sharding.steps import ShardedTrainStep, sharded_lean_step, sharded_train_step

__all__ = [
    "AXES",
    "Rules",
    "ShardedTrainStep",
    "batch_sharding",
    "check_shard_local",
    "compact_sharding",
    "delta_shardings",
    "lean_state_shardings",
    "make_mesh",
    "mask_shardings",
    "opt_state_shardings",
    "param_shardings",
    "partition_specs",
    "process_rows",
    "relayout",
    "shard_params",
    "sharded_lean_step",
    "sharded_train_step",
]
