"""Partition rules: ``(path regex, PartitionSpec)`` pairs that lay a parameter tree out on a mesh.

The first rule whose regex ``re.search``-es a leaf's '/'-joined path
(:func:`spra.masks.path_str`) gives its ``PartitionSpec``; leaves that no rule
matches are replicated. The rules of a model family live with the model
(:mod:`spra_jax.models.partition`); here is only the machinery that applies them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spra_jax.masks import path_str

__all__ = ["Rules", "param_shardings", "partition_specs", "shard_params"]

Rules = Sequence[tuple[str, P]]


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


def partition_specs(params: Any, rules: Rules, *, mesh: Mesh | None = None) -> Any:
  """The ``PartitionSpec`` of every leaf of ``params`` under path-regex ``rules``.

  The first rule whose regex ``re.search``-es the leaf's path wins; unmatched
  leaves are replicated (``P()``). With a ``mesh``, mesh axes that do not
  divide a dimension are dropped from it (that dimension is then replicated
  over them), so one rule set fits every model size.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``nnx.state(model)``).
    rules: ``(regex, PartitionSpec)`` pairs, e.g. ``spra.models.partition.rules_for('llama')``;
      ``()`` replicates everything.
    mesh: the mesh, to check axis names and divisibility.

  Raises:
    ValueError: if a rule has more entries than its leaf has dimensions, or names an axis the mesh lacks.

  Example:

    >>> import jax.numpy as jnp
    >>> params = {'model': {'layers': [{'self_attn': {'q_proj': {'kernel': jnp.zeros((64, 64))}}}],
    ...                     'norm': {'scale': jnp.ones(64)}}}
    >>> specs = partition_specs(params, [(r'q_proj/kernel$', P('fsdp', 'tensor'))])
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


def param_shardings(params: Any, mesh: Mesh, rules: Rules) -> Any:
  """``NamedSharding`` per leaf of ``params`` on ``mesh`` (see :func:`partition_specs`).

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.sharding import make_mesh
    >>> shardings = param_shardings({'lm_head': {'kernel': jnp.zeros((8, 16))}}, make_mesh(),
    ...                             [(r'lm_head/kernel$', P('fsdp', 'tensor'))])
    >>> shardings['lm_head']['kernel'].spec
    P('fsdp', 'tensor')
  """
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(params, rules, mesh=mesh),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, rules: Rules) -> Any:
  """``params`` placed on ``mesh`` by ``rules`` (``jax.device_put``).

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.sharding import make_mesh
    >>> p = shard_params({'w': jnp.ones((4, 4))}, make_mesh(), [(r'w', P('fsdp'))])
    >>> p['w'].sharding.spec
    P('fsdp', None)
  """
  return jax.device_put(params, param_shardings(params, mesh, rules))
