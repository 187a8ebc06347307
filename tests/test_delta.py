"""Sparse deltas: init, extract, merge, unmerge and sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax import masks

from conftest import random_like


def test_zero_delta_merges_to_the_base(params):
  mask = spra.sample_mask(0, params, density=0.1, full="head")
  delta = spra.init_delta(mask)
  assert delta.num_trainable == spra.num_trainable(mask)
  assert all(x.dtype == jnp.float32 and not x.any() for x in jax.tree.leaves(delta.values))
  for a, b in zip(jax.tree.leaves(spra.merge(params, delta)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_delta_is_a_pytree_that_goes_through_jit(params):
  mask = spra.sample_mask(0, params, density=0.1, full="head")
  delta = spra.init_delta(mask)
  n_sparse = sum(m.kind == "sparse" for m in jax.tree.leaves(mask, is_leaf=masks.is_leaf_mask))
  n_values = sum(m.kind != "frozen" for m in jax.tree.leaves(mask, is_leaf=masks.is_leaf_mask))
  assert len(jax.tree.leaves(delta)) == n_sparse + n_values  # indices + values
  doubled = jax.jit(lambda d: d.replace(values=jax.tree.map(lambda v: v + 2.0, d.values)))(delta)
  assert isinstance(doubled, spra.SparseDelta)
  assert all(float(v.min()) == 2.0 for v in jax.tree.leaves(doubled.values) if v.size)
  assert delta.nbytes == 4 * delta.num_trainable + 4 * sum(
      m.num_trainable for m in jax.tree.leaves(mask, is_leaf=masks.is_leaf_mask) if m.kind == "sparse")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extract_then_merge_gives_back_the_tuned_model(params, dtype):
  base = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  mask = spra.sample_mask(1, base, density=0.1, full="head")
  tx = spra.masked(optax.adam(1e-2), mask)
  state, tuned = tx.init(base), base
  for i in range(3):
    updates, state = tx.update(random_like(base, i), state, tuned)
    tuned = optax.apply_updates(tuned, updates)
  delta = spra.extract(tuned, base, mask)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(delta.values))
  merged = spra.merge(base, delta)
  for a, b, c in zip(jax.tree.leaves(merged), jax.tree.leaves(tuned), jax.tree.leaves(base)):
    assert a.dtype == b.dtype
    a, b, c = (np.asarray(x, np.float32) for x in (a, b, c))
    if dtype == jnp.bfloat16:  # the float32 difference of bf16 values is exact
      np.testing.assert_array_equal(a, b)
    else:  # within one float32 rounding at the larger of the two magnitudes
      assert np.all(np.abs(a - b) <= np.spacing(np.maximum(np.abs(b), np.abs(c))))


def test_merge_touches_only_masked_entries_and_unmerge_inverts_it(params):
  # Values on a dyadic grid: sums and differences are exact, so unmerge is bit-exact.
  params = jax.tree.map(lambda x: jnp.round(x * 1024) / 1024 if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  mask = spra.sample_mask(2, params, density=0.2, full="head")
  values = jax.tree.map(lambda v: jnp.full_like(v, 0.25), spra.init_delta(mask).values)
  delta = spra.init_delta(mask).replace(values=values)
  merged = spra.merge(params, delta)
  dense = spra.to_dense(mask)
  for p, q, m in zip(jax.tree.leaves(params), jax.tree.leaves(merged), jax.tree.leaves(dense)):
    p, q, m = np.asarray(p), np.asarray(q), np.asarray(m)
    np.testing.assert_array_equal(p[~m], q[~m])
    if m.any():
      np.testing.assert_array_equal(q[m], p[m] + 0.25)
  for a, b in zip(jax.tree.leaves(spra.unmerge(merged, delta)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_merge_under_jit_with_donated_base(params):
  mask = spra.sample_mask(2, params, density=0.2)
  delta = spra.init_delta(mask).replace(values=jax.tree.map(lambda v: v + 1, spra.init_delta(mask).values))
  expected = spra.merge(params, delta)
  copy = jax.tree.map(jnp.copy, params)
  merged = jax.jit(spra.merge, donate_argnums=0)(copy, delta)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_add_deltas_takes_the_union_and_sums_overlaps(params):
  a_mask = spra.sample_mask(0, params, density=0.3, include="layers")
  b_mask = spra.sample_mask(1, params, density=0.3, include="layers", full="head")
  a = spra.init_delta(a_mask).replace(values=jax.tree.map(lambda v: v + 1.0, spra.init_delta(a_mask).values))
  b = spra.init_delta(b_mask).replace(values=jax.tree.map(lambda v: v + 2.0, spra.init_delta(b_mask).values))
  total = a + b
  ia = np.asarray(a_mask["layers"][0]["mlp"]["kernel"].indices)
  ib = np.asarray(b_mask["layers"][0]["mlp"]["kernel"].indices)
  union = total.mask["layers"][0]["mlp"]["kernel"].indices
  np.testing.assert_array_equal(union, np.union1d(ia, ib))
  overlap = np.intersect1d(ia, ib)
  assert overlap.size > 0  # at density 0.3 two masks overlap
  vals = np.asarray(total.values["layers"][0]["mlp"]["kernel"])
  np.testing.assert_array_equal(vals[np.isin(np.asarray(union), overlap)], 3.0)
  assert total.mask["head"]["kernel"].kind == "full"
  assert total.mask["position_ids"].kind == "frozen"
  once = spra.merge(params, total)
  twice = spra.merge(spra.merge(params, a), b)
  for x, y in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_errors_name_the_problem(params):
  mask = spra.sample_mask(0, params, density=0.1)
  delta = spra.init_delta(mask)
  other = spra.init_delta(spra.sample_mask(0, {"w": jnp.zeros(10)}, density=0.5))
  with pytest.raises(ValueError, match="cannot add deltas: delta 1 has tree structure"):
    spra.add_deltas(delta, other)
  with pytest.raises(TypeError, match="expects SparseDelta arguments"):
    spra.add_deltas(delta, mask)
  with pytest.raises(ValueError, match="needs at least one delta"):
    spra.add_deltas()
  with pytest.raises(ValueError, match="parameters without a mask leaf"):
    spra.merge({**params, "extra": jnp.zeros(3)}, delta)
  wrong = {**params, "head": {"kernel": jnp.zeros((3, 32))}}
  with pytest.raises(ValueError, match="'head/kernel' has shape"):
    spra.extract(wrong, params, mask)
