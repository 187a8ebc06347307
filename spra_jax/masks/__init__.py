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
never changes another leaf's mask. A leaf whose budget rounds to 0 (a small bias at a low density) is frozen, with
a warning that names it; ``sample_mask(..., min_per_leaf=1)`` trains at least
one entry of every eligible leaf.

Example:

  >>> import jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> params = {'dense': {'kernel': jnp.zeros((64, 32)), 'bias': jnp.zeros(32)},
  ...           'head': {'kernel': jnp.zeros((32, 2))}}
  >>> mask = spra.sample_mask(jax.random.key(0), params, spra.masks.uniform(0.1),
  ...                         include='dense', full='head')
  >>> spra.num_trainable(mask)   # 10 % of 2,080 dense entries + 64 head entries
  272

The package has one concept per module, each importing only the ones listed above it:

* ``leaf``: the format: :class:`LeafMask`, the kinds, :func:`path_str`, :func:`validate`, :func:`from_dense`,
  :func:`to_dense`;
* ``_choice``: exact-k choice of sorted unique indices, in memory proportional to k;
* ``_allocation``: the allocation rules (a global density to a budget per leaf);
* ``distributions``: :class:`Distribution`, the registry (:func:`register`, :func:`get`, :func:`available`),
  :func:`uniform` and :func:`bernoulli`;
* ``structured``: :func:`rows`, :func:`columns`, :func:`blocks`, :func:`top_k`, :func:`magnitude`,
  :func:`fisher_scores`;
* ``layout``: the shard-local layout of a sharded leaf (its block grid, the sharding of its compact vector, a
  mask re-laid for another grid);
* ``sampling``: :func:`leaf_roles`, :func:`leaf_key`, :func:`sample_mask`;
* ``summaries``: :func:`num_trainable`, :func:`summary_rows`, :func:`summary`.
"""

from __future__ import annotations

from spra_jax.masks._allocation import _round_half_up as _round_half_up
from spra_jax.masks._choice import _choose_padded as _choose_padded
from spra_jax.masks._choice import _choose_sorted as _choose_sorted
from spra_jax.masks.distributions import Bernoulli, Distribution, Uniform, available, bernoulli, get, register, uniform
from spra_jax.masks.distributions import resolve_distribution as resolve_distribution
from spra_jax.masks.layout import block_budget as block_budget
from spra_jax.masks.layout import block_counts as block_counts
from spra_jax.masks.layout import block_grid as block_grid
from spra_jax.masks.layout import compact_sharding as compact_sharding
from spra_jax.masks.layout import leaf_sharding as leaf_sharding
from spra_jax.masks.layout import relayout_leaf as relayout_leaf
from spra_jax.masks.leaf import (
    FROZEN,
    FULL,
    SPARSE,
    LeafMask,
    from_dense,
    is_leaf_mask,
    path_str,
    to_dense,
    validate,
    validate_indices,
)
from spra_jax.masks.leaf import _leaf_masks_with_paths as _leaf_masks_with_paths
from spra_jax.masks.sampling import Pattern as Pattern
from spra_jax.masks.sampling import leaf_key, leaf_roles, sample_mask
from spra_jax.masks.structured import (
    Blocks,
    Columns,
    Rows,
    TopK,
    blocks,
    columns,
    fisher_scores,
    magnitude,
    rows,
    top_k,
)
from spra_jax.masks.summaries import num_trainable, summary, summary_rows

# What users call. Importable from here but left out (the ``name as name`` imports above): the sharding internals
# (block_grid, block_counts, leaf_sharding, compact_sharding, block_budget, relayout_leaf, also in
# spra_jax.masks.layout) and the Pattern type and
# resolve_distribution that spra.masked uses; and a few private helpers the package's tests reach as masks._name.
__all__ = [
    "FROZEN",
    "FULL",
    "SPARSE",
    "Bernoulli",
    "Blocks",
    "Columns",
    "Distribution",
    "LeafMask",
    "Rows",
    "TopK",
    "Uniform",
    "available",
    "bernoulli",
    "blocks",
    "columns",
    "fisher_scores",
    "from_dense",
    "get",
    "is_leaf_mask",
    "leaf_key",
    "leaf_roles",
    "magnitude",
    "num_trainable",
    "path_str",
    "register",
    "rows",
    "sample_mask",
    "summary",
    "summary_rows",
    "to_dense",
    "top_k",
    "uniform",
    "validate",
    "validate_indices",
]
