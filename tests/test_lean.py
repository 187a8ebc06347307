"""The lean path: attach, gradients w.r.t. deltas, in-place updates, lean_step, NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax import compact

from conftest import random_like, small_params


@pytest.fixture
def params():
  """The shared small tree without its int leaf, so plain jax.grad accepts it."""
  tree = small_params()
  del tree["position_ids"]
  return tree


def mlp_loss(params, x, y):
  h = x
  for layer in params["layers"]:
    h = jnp.tanh(h @ layer["mlp"]["kernel"][:, :32] + layer["mlp"]["bias"][:32])
    h = h @ (layer["attn"]["v_proj"]["kernel"] / 6) @ (layer["attn"]["q_proj"]["kernel"] / 6)
  return ((h @ params["head"]["kernel"] - y) ** 2).mean()


@pytest.fixture
def batch():
  return jax.random.normal(jax.random.key(1), (8, 32)), jax.random.normal(jax.random.key(2), (8, 3))


def test_attach_returns_the_params_values(params):
  mask = spra.sample_mask(0, params, density=0.1, full="head")
  attached = spra.attach(params, spra.init_delta(mask))
  for a, b in zip(jax.tree.leaves(attached), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", [True, False])
def test_delta_gradient_is_the_dense_gradient_gathered_at_the_mask(params, batch, jit):
  mask = spra.sample_mask(0, params, density=0.1, include="attn|mlp/kernel", full="head")
  delta = spra.init_delta(mask)
  grad_fn = spra.grad(lambda d: mlp_loss(spra.attach(params, d), *batch))
  grads = (jax.jit(grad_fn) if jit else grad_fn)(delta)
  dense = jax.grad(mlp_loss)(params, *batch)
  expected = compact.gather(dense, mask)
  assert isinstance(grads, spra.SparseDelta)
  for g, e in zip(jax.tree.leaves(grads.values), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-5)
  # The indices are carried along unchanged.
  for a, b in zip(jax.tree.leaves(grads.mask), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)


def test_value_and_grad_with_aux_and_several_argnums(params, batch):
  mask = spra.sample_mask(0, params, density=0.1)
  delta = spra.init_delta(mask)
  fn = lambda d, x: (mlp_loss(spra.attach(params, d), x, batch[1]), x.sum())
  (loss, aux), (g_delta, g_x) = spra.value_and_grad(fn, argnums=(0, 1), has_aux=True)(delta, batch[0])
  assert float(loss) == pytest.approx(float(mlp_loss(params, *batch)))
  assert float(aux) == pytest.approx(float(batch[0].sum()))
  assert isinstance(g_delta, spra.SparseDelta) and g_x.shape == batch[0].shape
  g_only, aux_only = spra.grad(fn, has_aux=True)(delta, batch[0])
  assert float(aux_only) == pytest.approx(float(aux))


def test_plain_jax_grad_needs_allow_int_and_then_gives_the_same_values(params, batch):
  delta = spra.init_delta(spra.sample_mask(0, params, density=0.1))
  loss = lambda d: mlp_loss(spra.attach(params, d), *batch)
  with pytest.raises(TypeError, match="allow_int"):
    jax.grad(loss)(delta)
  raw = jax.grad(loss, allow_int=True)(delta)
  for a, b in zip(jax.tree.leaves(raw.values), jax.tree.leaves(spra.grad(loss)(delta).values)):
    np.testing.assert_array_equal(a, b)


def test_frozen_leaves_get_no_weight_gradient_computation(params, batch):
  # Only v_proj is sparsified: the jaxpr of the gradient has no dot_general that
  # produces a q_proj-shaped weight gradient.
  mask = spra.sample_mask(0, params, density=0.1, include="v_proj")
  delta = spra.init_delta(mask)
  jaxpr = jax.make_jaxpr(spra.grad(lambda d: mlp_loss(spra.attach(params, d), *batch)))(delta)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  weight_grads = [e for e in dots if e.outvars[0].aval.shape == (32, 32)]
  assert len(weight_grads) == 2  # one per v_proj (forward products are activations)


def test_lean_step_matches_spra_masked_step_for_step(params, batch):
  mask = spra.sample_mask(3, params, density=0.1, include="attn|mlp", full="head")
  opt = optax.adam(1e-2)  # no weight decay: masked decays params, lean decays deltas
  step = spra.lean_step(mlp_loss, opt)
  state = step.init(jax.tree.map(jnp.copy, params), mask)
  tx = spra.masked(opt, mask)
  ref_params, ref_state = params, tx.init(params)
  for i in range(5):
    x = batch[0] + 0.1 * i
    state, loss = step(state, x, batch[1])
    ref_loss, grads = jax.value_and_grad(mlp_loss)(ref_params, x, batch[1])
    updates, ref_state = tx.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  state = step.flush(state)
  assert int(state.step) == 5
  # (two differently compiled programs: Adam's division by sqrt(v) turns a last-bit difference in a small gradient
  # into up to a few 1e-5 of a weight after 5 steps of 1e-2; a wrong entry would be off by a step, 1e-2)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=5e-5)
  # The weights equal base + delta.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(spra.merge(params, state.delta))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Off the mask the weights are bit-identical to the base.
  dense = spra.to_dense(mask)
  for a, b, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(np.asarray(a)[~np.asarray(m)], np.asarray(b)[~np.asarray(m)])


def test_lean_step_updates_the_weights_in_place_without_a_second_copy():
  layers, d = 6, 256
  params = {f"l{i}": jax.random.normal(jax.random.key(i), (d, d)) / 16 for i in range(layers)}

  def loss(p, x):
    for i in range(layers):
      x = jnp.tanh(x @ p[f"l{i}"])
    return (x**2).mean()

  x = jnp.ones((16, d))
  mask = spra.sample_mask(0, params, density=0.01)
  step = spra.lean_step(loss, optax.adamw(1e-3))
  state = step.init(params, mask)
  memory = step.lower(state, x).compile().memory_analysis()
  weight_bytes = layers * d * d * 4
  assert memory.alias_size_in_bytes >= weight_bytes  # every weight buffer is reused
  assert memory.temp_size_in_bytes < weight_bytes / 2  # no copy of the weights
  # Door 1 forms every dense weight gradient; the lean step never holds them all.
  door1 = spra.masked(optax.adamw(1e-3), mask)

  def door1_step(p, s, x):
    g = jax.grad(loss)(p, x)
    u, s = door1.update(g, s, p)
    return optax.apply_updates(p, u), s

  dense_memory = jax.jit(door1_step, donate_argnums=(0, 1)).lower(params, door1.init(params), x).compile().memory_analysis()
  assert memory.temp_size_in_bytes < dense_memory.temp_size_in_bytes


def test_lean_step_with_aux_resume_and_bf16(params, batch):
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  mask = spra.sample_mask(0, bf16, density=0.2, include="layers")
  loss_aux = lambda p, x, y: (mlp_loss(p, x.astype(jnp.bfloat16), y).astype(jnp.float32), jnp.ones(()))
  step = spra.lean_step(loss_aux, optax.sgd(0.5), has_aux=True)
  state = step.init(jax.tree.map(jnp.copy, bf16), mask)
  state, loss, aux = step(state, *batch)
  state, loss, aux = step(state, *batch)
  state = step.flush(state)
  assert float(aux) == 1.0
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.delta.values))
  assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(state.delta.values))
  # Resuming from a delta continues where it stopped (bf16 weights: with the base, for round(base + delta)).
  resumed = step.init(jax.tree.map(jnp.copy, state.params), state.delta, base=bf16)
  assert all(float(jnp.abs(p).max()) == 0 for p in jax.tree.leaves(resumed.pending))
  for a, b in zip(jax.tree.leaves(step.flush(resumed).params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apply_updates_writes_params_and_delta(params):
  mask = spra.sample_mask(0, params, density=0.1, full="head")
  delta = spra.init_delta(mask)
  updates = random_like(delta.values, 3)
  new_params, new_delta = spra.apply_updates(params, delta, updates)
  for v, u in zip(jax.tree.leaves(new_delta.values), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(v, u)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(spra.merge(params, new_delta))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="expects a SparseDelta"):
    spra.apply_updates(params, mask, updates)
  with pytest.raises(TypeError, match="attach expects a SparseDelta"):
    spra.attach(params, mask)


# ----------------------------------------------------------------- NNX


class Net(nnx.Module):
  def __init__(self, rngs):
    self.v_proj = nnx.Linear(16, 16, rngs=rngs)
    self.mlp = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.mlp(jnp.tanh(self.v_proj(x)))))


def test_nnx_adapter_trains_only_deltas_and_keeps_weights_equal_base_plus_delta():
  model = Net(nnx.Rngs(0))
  base = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  mask = spra.sample_mask(0, base, density=0.1, include="v_proj/kernel|mlp/kernel", full="^head/")
  adapter = spra.nnx.SparseAdapter(model, mask)
  optimizer = nnx.Optimizer(adapter, optax.adam(1e-2), wrt=spra.nnx.DeltaValue)
  x, y = jax.random.normal(jax.random.key(0), (8, 16)), jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def train_step(adapter, optimizer, x, y):
    loss_fn = lambda a: ((a(x) - y) ** 2).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, spra.nnx.DeltaValue))(adapter)
    optimizer.update(adapter, grads)
    return loss, grads

  losses = []
  for _ in range(10):
    loss, grads = train_step(adapter, optimizer, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
  # Gradients and optimizer state cover the k delta values only.
  k = spra.num_trainable(mask)
  assert sum(g.size for g in jax.tree.leaves(grads)) == k
  assert sum(m.size for m in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState)) if m.ndim) == 2 * k
  adapter.sync()
  delta = adapter.delta()
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(spra.merge(base, delta))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The frozen bias of v_proj never moved.
  np.testing.assert_array_equal(model.v_proj.bias[...], base["v_proj"]["bias"][...])
