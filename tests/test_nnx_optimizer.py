"""spra.masked as the transformation of nnx.Optimizer, and array-like (numpy, Python scalar) parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax import compact
from spra_jax.masks import LeafMask, is_leaf_mask

STEPS = 50
EAGER_STEPS = 10  # eager runs dispatch every operation of every step: the same comparison, fewer steps


class TwoLayers(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


X = jax.random.normal(jax.random.key(1), (16, 4))
Y = jax.random.normal(jax.random.key(2), (16, 2))


def nnx_loss(model):
  return ((model(X) - Y) ** 2).mean()


def dict_loss(p):
  h = jnp.tanh(X @ p["l1"]["kernel"] + p["l1"]["bias"])
  return ((h @ p["l2"]["kernel"] + p["l2"]["bias"] - Y) ** 2).mean()


def make_tx(mask=None):
  if mask is not None:
    return spra.masked(optax.adam(1e-2), mask)
  return spra.masked(optax.adam(1e-2), density=0.3, key=0)


def train_nnx(tx, *, jit, steps=STEPS):
  model = TwoLayers(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(nnx_loss)(model)
    optimizer.update(model, grads)
    return loss

  step = nnx.jit(step) if jit else step
  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return model, optimizer, losses


def train_dict(tx, *, jit, steps=STEPS):
  params = nnx.to_pure_dict(nnx.state(TwoLayers(nnx.Rngs(0)), nnx.Param))
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(dict_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def assert_masks_equal(a, b):
  fa, fb = jax.tree.leaves(a, is_leaf=is_leaf_mask), jax.tree.leaves(b, is_leaf=is_leaf_mask)
  assert len(fa) == len(fb)
  for x, y in zip(fa, fb):
    assert isinstance(x, LeafMask) and isinstance(y, LeafMask)
    assert (x.kind, x.shape, x.blocks) == (y.kind, y.shape, y.blocks)
    np.testing.assert_array_equal(np.asarray(x.indices), np.asarray(y.indices))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
def test_nnx_optimizer_trains_like_the_dict_path(jit):
  """50 steps under nnx.jit (10 eager) equal the dict path's, on and off the mask."""
  steps = STEPS if jit else EAGER_STEPS
  start = nnx.to_pure_dict(nnx.state(TwoLayers(nnx.Rngs(0)), nnx.Param))
  model, optimizer, losses = train_nnx(make_tx(), jit=jit, steps=steps)
  ref_params, ref_state = train_dict(make_tx(), jit=jit, steps=steps)
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == steps

  # The mask survives NNX's state handling: mask_of reads it, intact, from the optimizer's state.
  mask = spra.mask_of(optimizer.opt_state)
  assert_masks_equal(mask, spra.mask_of(ref_state))
  assert 0 < spra.num_trainable(mask) < sum(x.size for x in jax.tree.leaves(start))

  trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  on_mask = jax.tree.leaves(spra.to_dense(mask))
  for before, after, ref, m in zip(jax.tree.leaves(start), jax.tree.leaves(trained), jax.tree.leaves(ref_params),
                                   on_mask):
    before, after, m = np.asarray(before), np.asarray(after), np.asarray(m)
    np.testing.assert_array_equal(after[~m], before[~m])  # frozen entries: bit-identical
    assert np.all(after[m] != before[m])
    np.testing.assert_allclose(after, np.asarray(ref), rtol=1e-6, atol=0)


def test_nnx_optimizer_keeps_a_given_mask_with_shard_blocks():
  """A mask given up front (sampled on nnx.state, so with Param wrappers), one leaf shard-local: kept as it is."""
  state = nnx.state(TwoLayers(nnx.Rngs(0)), nnx.Param)
  mask = spra.sample_mask(0, state, density=0.3)
  # l1/kernel (4, 8) as 2 column blocks: slice 0 in columns 0-3, slice 1 in columns 4-7.
  blocked = LeafMask.sparse((4, 8), jnp.array([0, 9, 4, 13], jnp.int32), blocks=(1, 2))
  mask["l1"]["kernel"] = nnx.Param(blocked)
  model, optimizer, _ = train_nnx(make_tx(mask), jit=True)
  got = spra.mask_of(optimizer.opt_state)
  assert_masks_equal(got, nnx.as_pure(mask))
  assert got["l1"]["kernel"].blocks == (1, 2)
  moved = np.asarray(model.l1.kernel[...]) != np.asarray(state["l1"]["kernel"][...])
  np.testing.assert_array_equal(np.flatnonzero(moved), [0, 4, 9, 13])


def test_variable_wrapped_grads_get_updates_of_their_structure():
  """nnx.state trees (Param wrappers) in init and update, outside nnx.Optimizer, as with plain optax."""
  params = nnx.state(TwoLayers(nnx.Rngs(0)), nnx.Param)
  tx = make_tx()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  plain_updates, _ = tx.update(*(nnx.as_pure(t) for t in (grads, tx.init(params), params)))
  for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert all(isinstance(m, LeafMask) for m in jax.tree.leaves(spra.mask_of(state), is_leaf=is_leaf_mask))


def _np_params():
  rng = np.random.default_rng(0)
  return {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
          "head": rng.standard_normal((5, 2)).astype(np.float32)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_numpy_params_and_grads_match_the_jnp_path(jit):
  np_params = _np_params()
  tx = spra.masked(optax.adamw(1e-2), density=0.3, key=0, full="head")
  update = jax.jit(tx.update) if jit else tx.update
  np_state, jnp_state = tx.init(np_params), tx.init(jax.tree.map(jnp.asarray, np_params))
  assert_masks_equal(spra.mask_of(np_state), spra.mask_of(jnp_state))
  p_np, p_jnp = np_params, jax.tree.map(jnp.asarray, np_params)
  for i in range(3):
    g = jax.tree.map(lambda x: np.random.default_rng(i).standard_normal(x.shape).astype(np.float32), np_params)
    u_np, np_state = update(g, np_state, p_np)
    u_jnp, jnp_state = update(jax.tree.map(jnp.asarray, g), jnp_state, p_jnp)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u_np, u_jnp)
    p_np = jax.tree.map(np.asarray, optax.apply_updates(p_np, u_np))  # numpy params take the updates; stay numpy
    p_jnp = optax.apply_updates(p_jnp, u_jnp)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_np, p_jnp)
  frozen = ~np.asarray(spra.to_dense(spra.mask_of(np_state))["w"])
  np.testing.assert_array_equal(np.asarray(p_np["w"])[frozen], np_params["w"][frozen])


def test_python_scalar_and_list_params():
  params = {"a": 1.5, "b": [1.0, 2.0, 3.0, 4.0]}
  tx = spra.masked(optax.sgd(0.1), density=0.5, key=0)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(lambda _: 1.0, params), state, params)
  ref_updates, _ = tx.update(*(jax.tree.map(jnp.asarray, t) for t in (jax.tree.map(lambda _: 1.0, params),
                                                                    tx.init(params), params)))
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), updates, ref_updates)
  new = optax.apply_updates(params, updates)
  assert sorted(float(v) for v in jax.tree.leaves(new)) != sorted(float(v) for v in jax.tree.leaves(params))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_compact_helpers_take_numpy(jit):
  mask = {"w": LeafMask.sparse((2, 4), np.array([1, 3, 4, 6], np.int32)),
          "s": LeafMask.sparse((2, 4), jnp.array([4, 1, 3, 6], jnp.int32), blocks=(1, 2)),
          "f": LeafMask.full((3,)), "z": LeafMask.frozen((2,))}
  tree = {"w": np.arange(8, dtype=np.float32).reshape(2, 4), "s": np.arange(8, dtype=np.float32).reshape(2, 4),
          "f": np.ones(3, np.float32), "z": np.ones(2, np.float32)}
  wrap = jax.jit if jit else (lambda f: f)
  got = wrap(compact.gather)(tree, mask)
  np.testing.assert_array_equal(np.asarray(got["w"]), [1, 3, 4, 6])
  np.testing.assert_array_equal(np.asarray(got["s"]), [4, 1, 3, 6])
  dense = wrap(compact.scatter)(jax.tree.map(np.asarray, got), mask, tree)
  np.testing.assert_array_equal(np.asarray(dense["w"]), [[0, 1, 0, 3], [4, 0, 6, 0]])
  np.testing.assert_array_equal(np.asarray(dense["z"]), [0, 0])
  added = wrap(compact.scatter_add)(tree, jax.tree.map(np.asarray, got), mask)
  np.testing.assert_array_equal(np.asarray(added["w"]), [[0, 2, 2, 6], [8, 5, 12, 7]])
  np.testing.assert_array_equal(np.asarray(added["f"]), [2, 2, 2])
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(added))
