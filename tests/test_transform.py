"""spra.masked: zero updates off the mask, parity with dense Optax, compact state, combinators."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax import masks

from conftest import random_like, tree_nbytes


def assert_zero_outside(updates, mask):
  for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(spra.to_dense(mask))):
    off = np.asarray(u)[~np.asarray(m)]
    assert np.all(off == 0), "updates must be exactly zero outside the mask"
    assert not np.any(np.signbit(off)), "and not -0.0"


def run_steps(tx, params, steps=4, jit=True, grads_seed=0, **extra):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for i in range(steps):
    grads = random_like(params, grads_seed + i)
    updates, state = update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return params, state, history


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_updates_are_exactly_zero_outside_the_mask(params, jit, inner):
  opt = optax.sgd(0.1, momentum=0.9) if inner == "sgd" else optax.adamw(1e-2, weight_decay=0.1)
  mask = spra.sample_mask(0, params, density=0.05, full="head")
  new_params, _, history = run_steps(spra.masked(opt, mask), params, jit=jit)
  for updates in history:
    assert_zero_outside(updates, mask)
  # Parameters off the mask are bit-identical to the start.
  dense = spra.to_dense(mask)
  for p0, p1, m in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(np.asarray(p0)[~np.asarray(m)], np.asarray(p1)[~np.asarray(m)])


@pytest.mark.parametrize("jit", [True, False])
def test_matches_dense_adamw_on_the_selected_entries(params, jit):
  opt = optax.adamw(3e-2, b1=0.9, b2=0.99, weight_decay=0.05)
  mask = spra.sample_mask(1, params, density=0.1, include="attn|mlp", full="head")
  sparse_params, _, _ = run_steps(spra.masked(opt, mask), params, steps=6, jit=jit)
  dense_params, _, _ = run_steps(opt, params, steps=6, jit=jit)
  dense = spra.to_dense(mask)
  for path_m, s, d, m in zip(
      jax.tree_util.tree_flatten_with_path(mask, is_leaf=masks.is_leaf_mask)[0],
      jax.tree.leaves(sparse_params), jax.tree.leaves(dense_params), jax.tree.leaves(dense)):
    sel = np.asarray(m)
    np.testing.assert_allclose(np.asarray(s)[sel], np.asarray(d)[sel], atol=1e-6, rtol=0, err_msg=str(path_m[0]))
  assert sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(dense)) == spra.num_trainable(mask)


def test_adamw_state_is_compact_and_holds_the_indices():
  params = {f"w{i}": jnp.zeros((256, 256)) for i in range(3)} | {"b": jnp.zeros(256)}
  for density in (0.001, 0.01, 0.1):
    tx = spra.masked(optax.adamw(1e-3), density=density, key=0)
    # At 0.001, 'b' gets round(0.256) = 0 entries: it is frozen, with a warning.
    with pytest.warns(UserWarning, match=r"'b' \(256 entries\)") if density == 0.001 else contextlib.nullcontext():
      state = tx.init(params)
    dense_bytes = tree_nbytes(optax.adamw(1e-3).init(params))
    sparse_bytes = tree_nbytes(state)  # moments, count and the int32 indices
    ratio = sparse_bytes / dense_bytes
    assert ratio <= 1.6 * density, (density, ratio)
    assert sparse_bytes >= tree_nbytes(jax.tree.leaves(spra.mask_of(state)))  # indices are in the state
    mu = state.inner_state[0].mu
    assert [x.shape for x in jax.tree.leaves(mu)] == [(m.num_trainable,) for m in jax.tree.leaves(state.mask, is_leaf=masks.is_leaf_mask) if m.kind != masks.FROZEN]


def test_init_and_update_under_jit_match_eager(params):
  tx = spra.masked(optax.adamw(1e-2), density=0.1, key=jax.random.key(4), full="head")
  eager_state = tx.init(params)
  jit_state = jax.jit(tx.init)(params)
  for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jit_state)):
    np.testing.assert_array_equal(a, b)
  grads = random_like(params, 1)
  ue, _ = tx.update(grads, eager_state, params)
  uj, _ = jax.jit(tx.update)(grads, jit_state, params)
  for a, b in zip(jax.tree.leaves(ue), jax.tree.leaves(uj)):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_init_on_shape_dtype_structs(params):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = spra.masked(optax.adamw(1e-2), density=0.1, key=2, full="head")
  direct = tx.init(abstract)  # sampling needs only shapes
  via_eval_shape = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(params)
  shapes = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]
  assert shapes(direct) == shapes(concrete) == shapes(via_eval_shape)
  np.testing.assert_array_equal(
      direct.mask["layers"][0]["mlp"]["kernel"].indices, concrete.mask["layers"][0]["mlp"]["kernel"].indices)
  # And an explicit mask with abstract params.
  mask = spra.sample_mask(2, abstract, density=0.1)
  assert shapes(jax.eval_shape(spra.masked(optax.sgd(0.1), mask).init, abstract)) == shapes(spra.masked(optax.sgd(0.1), mask).init(params))


def test_inside_optax_chain(params):
  mask = spra.sample_mask(0, params, density=0.1)
  tx = optax.chain(optax.scale_by_adam(), spra.masked(optax.sgd(0.1), mask))
  _, _, history = run_steps(tx, params, steps=2)
  assert_zero_outside(history[-1], mask)
  assert spra.num_trainable(spra.mask_of(tx.init(params))) == spra.num_trainable(mask)


def test_clip_by_global_norm_inside_sees_trained_entries_only(params):
  mask = spra.sample_mask(3, params, density=0.1, full="head")
  dense = spra.to_dense(mask)
  grads = random_like(params, 0)
  # Huge gradients on frozen entries must not shrink the trained ones.
  grads = jax.tree.map(lambda g, m: jnp.where(m, g, 1e6) if jnp.issubdtype(g.dtype, jnp.floating) else g, grads, dense)
  tx = spra.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), mask)
  updates, _ = tx.update(grads, tx.init(params), params)
  masked_grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0) if jnp.issubdtype(g.dtype, jnp.floating) else g, grads, dense)
  float_only = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
  norm = optax.tree.norm(float_only(masked_grads))
  assert float(norm) > 1.0  # so clipping is active
  expected = jax.tree.map(lambda g: -g / norm, float_only(masked_grads))
  for u, e in zip(float_only(updates), expected):
    np.testing.assert_allclose(u, e, atol=1e-6)
  assert float(optax.tree.norm(float_only(updates))) == pytest.approx(1.0, rel=1e-5)


def test_inject_hyperparams_inside_can_change_the_learning_rate(params):
  mask = spra.sample_mask(0, params, density=0.1)
  tx = spra.masked(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), mask)
  state = tx.init(params)
  grads = random_like(params, 0)
  u1, state = tx.update(grads, state, params)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  u2, _ = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-6)


def test_multisteps_inside_accumulates_compact_gradients(params):
  opt = optax.adamw(1e-2)
  mask = spra.sample_mask(5, params, density=0.1)
  tx = spra.masked(optax.MultiSteps(opt, every_k_schedule=3), mask)
  state = tx.init(params)
  acc = state.inner_state.acc_grads
  assert [x.shape for x in jax.tree.leaves(acc)] == [(m.num_trainable,) for m in jax.tree.leaves(mask, is_leaf=masks.is_leaf_mask) if m.kind != "frozen"]
  dense_tx = optax.MultiSteps(opt, every_k_schedule=3)
  dense_state = dense_tx.init(params)
  p_sparse, p_dense = params, params
  for i in range(6):
    g = random_like(params, 10 + i)
    u, state = jax.jit(tx.update)(g, state, p_sparse)
    du, dense_state = dense_tx.update(g, dense_state, p_dense)
    if i % 3 != 2:
      assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))  # still accumulating
    p_sparse, p_dense = optax.apply_updates(p_sparse, u), optax.apply_updates(p_dense, du)
  for s, d, m in zip(jax.tree.leaves(p_sparse), jax.tree.leaves(p_dense), jax.tree.leaves(spra.to_dense(mask))):
    np.testing.assert_allclose(np.asarray(s)[np.asarray(m)], np.asarray(d)[np.asarray(m)], atol=1e-6)


def test_apply_if_finite_inside_ignores_frozen_entries_and_outside_sees_all(params):
  mask = spra.sample_mask(0, params, density=0.1, include="layers")
  grads = random_like(params, 0)
  grads["head"]["kernel"] = grads["head"]["kernel"].at[0, 0].set(jnp.nan)  # a frozen leaf
  inside = spra.masked(optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3), mask)
  u_in, s_in = inside.update(grads, inside.init(params), params)
  assert int(s_in.inner_state.notfinite_count) == 0
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u_in))
  outside = optax.apply_if_finite(spra.masked(optax.sgd(0.1), mask), max_consecutive_errors=3)
  u_out, s_out = outside.update(grads, outside.init(params), params)
  assert int(s_out.notfinite_count) == 1
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u_out) if jnp.issubdtype(x.dtype, jnp.floating))
  assert spra.num_trainable(spra.mask_of(s_out)) == spra.num_trainable(mask)
  # A NaN on a trained entry is caught inside too.
  i = int(mask["layers"][0]["mlp"]["kernel"].indices[0])
  bad = jax.tree.map(lambda x: x, grads)
  bad["layers"][0]["mlp"]["kernel"] = bad["layers"][0]["mlp"]["kernel"].reshape(-1).at[i].set(jnp.inf).reshape(32, 64)
  _, s_bad = inside.update(bad, inside.init(params), params)
  assert int(s_bad.inner_state.notfinite_count) == 1


def test_extra_args_reach_the_inner_transformation(params):
  mask = spra.sample_mask(0, params, density=0.1)
  plateau = optax.contrib.reduce_on_plateau(patience=0, factor=0.5, cooldown=0, accumulation_size=1)
  tx = spra.masked(optax.chain(optax.sgd(1.0), plateau), mask)
  state = tx.init(params)
  grads = random_like(params, 0)
  _, state = tx.update(grads, state, params, value=jnp.asarray(1.0))
  u, state = tx.update(grads, state, params, value=jnp.asarray(2.0))  # worse: the scale halves
  assert float(state.inner_state[1].scale) == pytest.approx(0.5)


def test_mask_of_finds_the_state_and_reports_problems(params):
  tx = optax.chain(optax.scale(1.0), spra.masked(optax.sgd(0.1), density=0.1, key=0))
  mask = spra.mask_of(tx.init(params))
  assert spra.num_trainable(mask) == spra.num_trainable(spra.sample_mask(0, params, density=0.1))
  with pytest.raises(ValueError, match="holds no spra.masked state"):
    spra.mask_of(optax.adamw(1e-3).init(params))
  two = optax.chain(spra.masked(optax.sgd(0.1), density=0.1, key=0), spra.masked(optax.sgd(0.1), density=0.1, key=1))
  with pytest.raises(ValueError, match="holds 2 spra.masked states"):
    spra.mask_of(two.init(params))


def test_argument_errors():
  with pytest.raises(ValueError, match="needs a mask, or a key"):
    spra.masked(optax.sgd(0.1), density=0.01)
  with pytest.raises(ValueError, match="got a mask and also density, key"):
    spra.masked(optax.sgd(0.1), {"w": spra.LeafMask.full((2,))}, density=0.1, key=0)
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
    spra.masked(optax.sgd(0.1), density=2.0, key=0)
  with pytest.raises(TypeError, match="inner must be an Optax GradientTransformation"):
    spra.masked(lambda g: g, density=0.1, key=0)


def test_mask_that_does_not_fit_is_rejected_at_init_and_update(params):
  mask = spra.sample_mask(0, params, density=0.1)
  tx = spra.masked(optax.sgd(0.1), mask)
  wrong = {**params, "head": {"kernel": jnp.zeros((32, 4))}}
  with pytest.raises(ValueError, match="mask leaf 'head/kernel' has shape"):
    tx.init(wrong)
  state = tx.init(params)
  with pytest.raises(ValueError, match="parameters without a mask leaf: 'new'"):
    tx.update({**params, "new": jnp.zeros(2)}, state, params)


def test_map_params_gets_a_clear_error(params):
  tx = spra.masked(optax.adam(1e-3), density=0.25, key=0)
  with pytest.raises(TypeError, match="compact .* not shaped like the parameters"):
    optax.tree.map_params(tx, lambda p: p, tx.init(params))
