"""``spra.masked``: an Optax transformation that trains a sparse subset of entries.

The wrapper gathers the gradients (and parameters) at the mask's entries into
compact vectors, runs the inner Optax transformation on those, and scatters its
updates back, exactly zero everywhere else:

.. math::

  g_c = g[\\phi], \\qquad (u_c, s') = \\mathrm{inner}(g_c, s, \\theta[\\phi]), \\qquad
  u = \\mathrm{scatter}(u_c, \\phi) .

The inner state is therefore built on k entries per leaf: AdamW's moments cost
2·k values instead of 2·N, and the state also carries the int32 indices φ, so it
checkpoints and shards with the rest of the state.

For parameters narrower than float32 (bf16, f16) the state also keeps float32
*masters* μ of the trained entries (O(k)): the inner transformation runs on
them, μ' = μ + u_c, and the emitted update is ``round(μ') - θ[φ]`` in float32,
so that ``optax.apply_updates`` lands each trained entry on its master rounded
once, however small each step's update (an update below half a bf16 spacing,
3.9e-3 at 1.0, would otherwise be rounded away every step).

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> import spra_jax as spra
  >>> params = {'w': jnp.ones((32, 32)), 'b': jnp.zeros(32)}
  >>> tx = spra.masked(optax.adamw(1e-2), density=0.05, key=jax.random.key(0))
  >>> state = tx.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = tx.update(grads, state, params)
  >>> int((updates['w'] != 0).sum()), spra.num_trainable(spra.mask_of(state))
  (51, 53)
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import optax

from spra_jax import compact, precision
from spra_jax.masks import Distribution, Pattern, resolve_distribution, sample_mask, validate
from spra_jax.masks.sampling import check_min_per_leaf

__all__ = ["SparseMaskedState", "masked", "mask_of"]


class SparseMaskedState(NamedTuple):
  """State of :func:`masked`.

  Attributes:
    mask: the mask (a params-shaped tree of ``LeafMask``; its leaves are the
      int32 index vectors).
    inner_state: the inner transformation's state over the compact tree.
    masters: float32 values of the trained entries of every leaf narrower than
      float32 (a compact tree, None per other leaf), or None when there are
      none or ``masters=False``.
  """

  mask: Any
  inner_state: optax.OptState
  masters: Any = None


def without_variables(tree: Any) -> Any:
  """``tree`` with every Flax NNX ``Variable`` replaced by its value (``tree`` itself if it holds none).

  >>> import jax.numpy as jnp
  >>> tree = {'w': jnp.ones(2)}
  >>> without_variables(tree) is tree
  True

  A mask sampled on ``nnx.state(model, nnx.Param)`` has a ``Param`` around each
  ``LeafMask``. Kept in the state, such a Variable is what ``nnx.Optimizer``
  sees as one optimizer-state leaf: it rewraps it whole and later writes the
  flattened indices into it, and the mask's static part (kind, shape, blocks)
  is lost. Without the Variables the state's only leaves are index arrays, and
  any handler that maps over array leaves and rebuilds the tree keeps every
  ``LeafMask`` intact. Flax is only consulted when already imported: a tree
  can hold no Variable otherwise.
  """
  nnx = sys.modules.get("flax.nnx")
  variable = getattr(nnx, "Variable", None)
  if variable is None:
    return tree

  def is_variable(x: Any) -> bool:
    return isinstance(x, variable)

  if not any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable)):
    return tree
  return nnx.as_pure(tree)


def _as_extra_args_transform(inner: Any) -> optax.GradientTransformationExtraArgs:
  if isinstance(inner, optax.MultiSteps):
    inner = inner.gradient_transformation()
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(f"inner must be an Optax GradientTransformation, got {type(inner).__name__}.")
  return optax.with_extra_args_support(inner)


def masked(
    inner: optax.GradientTransformation | optax.MultiSteps,
    mask: Any = None,
    *,
    density: float | None = None,
    key: Any = None,
    distribution: Distribution | str | None = None,
    include: Pattern = None,
    exclude: Pattern = None,
    full: Pattern = None,
    min_per_leaf: int = 0,
    masters: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Trains only the entries of a sparse mask, with O(k) optimizer state.

  Give either a ``mask`` (from :func:`spra.sample_mask`) or a ``key`` together
  with a ``density`` or ``distribution``, and ``init`` samples the mask from the
  parameters (which may be ``jax.ShapeDtypeStruct``) with
  ``sample_mask(key, params, distribution, include=..., exclude=..., full=...)``.
  Parameters may be any arrays optax accepts (numpy arrays and Python scalars
  included).

  It works as the transformation of ``nnx.Optimizer(model, tx, wrt=nnx.Param)``:
  Flax NNX ``Variable`` wrappers in the parameters, gradients or mask are
  dropped in the state (its mask and inner state hold plain arrays), and the
  updates come back in the structure of the gradients given.

  Updates are exactly zero outside the mask. Anything that should see only the
  trained entries belongs *inside* the wrapper: ``optax.clip_by_global_norm``
  (norms over trained entries only), ``optax.MultiSteps`` (it then accumulates
  compact gradients), ``optax.apply_if_finite``. Extra arguments of ``update``
  are passed to the inner transformation unchanged.

  Args:
    inner: the Optax transformation to run on the trainable entries.
    mask: a mask with the structure of the parameters.
    density: fraction of eligible entries to train (with ``key``).
    key: PRNG key (or int seed) the mask is sampled from at ``init``.
    distribution: a ``spra.masks.Distribution`` or registered name.
    include: regex(es) for the leaves that may be sparsified.
    exclude: regex(es) for leaves never sparsified.
    full: regex(es) for leaves that train every entry.
    min_per_leaf: every eligible leaf trains at least ``min(min_per_leaf, leaf size)`` entries (with ``key``): a
      small leaf whose budget rounds to 0 is otherwise frozen, with a warning; see :func:`spra.sample_mask`.
    masters: for parameters narrower than float32, keep float32 master values
      of the trained entries in the state (4 bytes per trained entry) and run
      the inner transformation on them; updates of those leaves are then
      float32 arrays that move each trained entry to its master rounded once
      (see the module docstring). Off, the inner transformation sees the
      low-precision values and small updates may round away. No effect on
      float32 parameters.

  What must hold with masters: the updates are applied as
  ``optax.apply_updates`` does (add in float32, round once to the parameter's
  dtype), every step; give ``params`` to ``update`` (otherwise the trained
  entries are taken to be the old masters rounded, and the rounding dtype is
  the gradients').

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SparseMaskedState`.

  Raises:
    ValueError: for conflicting or missing arguments (e.g. ``density`` without
      ``key``), and, at ``init``/``update``, a mask that does not fit the tree.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> import spra_jax as spra
    >>> params = {'hidden': jnp.zeros((64, 64)), 'head': jnp.zeros((64, 2))}
    >>> mask = spra.sample_mask(jax.random.key(0), params, density=0.01,
    ...                         include='hidden', full='head')
    >>> tx = spra.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), mask)
    >>> state = jax.jit(tx.init)(params)
    >>> [x.shape for x in jax.tree.leaves(state.inner_state[1][0].mu)]
    [(64, 2), (41,)]
  """
  inner = _as_extra_args_transform(inner)
  check_min_per_leaf(min_per_leaf)  # at build time, like every other argument
  sampling_args = {"density": density, "key": key, "distribution": distribution, "include": include,
                   "exclude": exclude, "full": full, "min_per_leaf": min_per_leaf or None}
  if mask is not None:
    given = [name for name, v in sampling_args.items() if v is not None]
    if given:
      raise ValueError(
          f"masked() got a mask and also {', '.join(given)}; these sample a mask at init. Give one or the other."
      )
    mask = without_variables(mask)  # e.g. sampled on nnx.state(model, nnx.Param): a Param around each LeafMask
    dist = None
  else:
    if key is None:
      raise ValueError(
          "masked() needs a mask, or a key to sample one: e.g. "
          "spra.masked(optax.adamw(1e-4), density=0.01, key=jax.random.key(0))."
      )
    dist = resolve_distribution(distribution, density)

  def init_fn(params):
    params = without_variables(params)  # NNX Variables stay out of the optimizer state; see without_variables
    if type(params).__name__ == "_ParamsPlaceholder":
      raise TypeError(
          "spra.masked's state is compact (k entries per leaf), not shaped like the parameters, so "
          "optax.tree.map_params cannot map parameter-shaped values onto it; map over the state with "
          "jax.tree.map, or take the mask from spra.mask_of(state)."
      )
    m = mask
    if m is None:
      m = sample_mask(key, params, dist, include=include, exclude=exclude, full=full, min_per_leaf=min_per_leaf)
    validate(m, params)
    masters_ = precision.float32_masters(params, m) if masters else None
    return SparseMaskedState(mask=m, inner_state=inner.init(_with_masters(compact.gather(params, m), masters_, m)),
                             masters=masters_)

  def update_fn(updates, state, params=None, **extra_args):
    # A state or gradients that still hold NNX Variables (e.g. ``nnx.Optimizer``'s own ``opt_state``, or
    # ``nnx.state(grads)``) are read through their values; the updates are given back the gradients' structure.
    state = without_variables(state)
    grads = without_variables(updates)
    m = state.mask
    validate(m, grads, check_indices=False)
    compact_grads = compact.gather(grads, m)
    compact_params = None if params is None else compact.gather(without_variables(params), m)
    masters_ = state.masters
    if masters_ is None:
      compact_updates, inner_state = inner.update(compact_grads, state.inner_state, compact_params, **extra_args)
      dense = compact.scatter(compact_updates, m, grads)
    else:
      compact_grads = compact.map_leaves(_grad_for_master, m, compact_grads, masters_)
      compact_updates, inner_state = inner.update(compact_grads, state.inner_state,
                                                  _with_masters(compact_params, masters_, m), **extra_args)
      masters_, compact_updates = _step_masters(m, masters_, compact_updates, compact_params, grads)
      dense = compact.scatter(compact_updates, m, compact.map_leaves(_update_like, m, grads, masters_))
    if grads is not updates:
      dense = jax.tree.structure(updates).unflatten(jax.tree.leaves(dense))
    return dense, SparseMaskedState(mask=m, inner_state=inner_state, masters=masters_)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_masters(compact_params: Any, masters: Any, mask: Any) -> Any:
  """The compact parameters the inner transformation sees: the masters where they exist."""
  if masters is None:
    return compact_params
  if compact_params is None:  # no params given to update: the masters are the only values there are
    return compact.map_leaves(lambda m, mu: mu, mask, masters)
  return compact.map_leaves(lambda m, p, mu: p if mu is None else mu, mask, compact_params, masters)


def _grad_for_master(m: Any, g: Any, mu: Any) -> Any:
  return g if mu is None or g is None else g.astype(mu.dtype)


def _update_like(m: Any, g: Any, mu: Any) -> Any:
  """The dtype template of a leaf's dense update: float32 where a master moves the entries, else the gradient's."""
  return g if mu is None else jax.ShapeDtypeStruct(m.shape, mu.dtype)


def _step_masters(mask: Any, masters: Any, compact_updates: Any, compact_params: Any, grads: Any):
  """The new masters and the float32 updates that land each trained entry on its new master, rounded once."""

  def new_master(m, mu, u):
    return None if mu is None else mu + u.astype(mu.dtype)

  new_masters = compact.map_leaves(new_master, mask, masters, compact_updates)
  params_or_nones = compact.map_leaves(lambda m: None, mask) if compact_params is None else compact_params

  def update(m, mu, new, u, p, g):
    if mu is None:
      return u
    # What the entry holds now and the dtype it is rounded to: the params' (without params, the old master rounded
    # to the gradients' dtype). round(new) - current is exact in float32 for nearby values and otherwise within a
    # float32 rounding, far below half a low-precision spacing, so apply_updates' p + update rounds to round(new).
    dtype = (p if p is not None else g).dtype
    current = p if p is not None else mu.astype(dtype)
    return new.astype(dtype).astype(mu.dtype) - current.astype(mu.dtype)

  updates = compact.map_leaves(update, mask, masters, new_masters, compact_updates, params_or_nones, grads)
  return new_masters, updates


def mask_of(opt_state: optax.OptState) -> Any:
  """The mask inside an optimizer state built by :func:`masked`.

  The state may be nested in other states (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.apply_if_finite``, ...), or be the
  ``opt_state`` of an ``nnx.Optimizer`` (its Variables are read through).

  Raises:
    ValueError: if the state holds no :class:`SparseMaskedState`, or several.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> import spra_jax as spra
    >>> tx = optax.chain(optax.scale(0.5), spra.masked(optax.sgd(0.1), density=0.5, key=0))
    >>> mask = spra.mask_of(tx.init({'w': jnp.zeros(10)}))
    >>> spra.num_trainable(mask)
    5
  """
  found = [
      s
      for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseMaskedState))
      if isinstance(s, SparseMaskedState)
  ]
  if not found:
    raise ValueError("the optimizer state holds no spra.masked state; was it built with spra.masked(...)?")
  if len(found) > 1:
    raise ValueError(
        f"the optimizer state holds {len(found)} spra.masked states; take the mask from the one you mean, "
        "e.g. state[i].mask."
    )
  return without_variables(found[0].mask)
