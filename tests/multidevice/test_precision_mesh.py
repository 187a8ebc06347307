"""bf16 weights on 8 devices: the lean step's base entries and spra.masked's masters are sharded like the deltas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tiny_llama as tl
from test_sharding import DENSITY, RULES, TRAIN, adamw, assert_same_layout, count_collectives, mesh_of, one_device

import spra_jax as spra
from spra_jax import sharding as sh


def bf16_params():
  return jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), tl.init_params())


def bf16_loss(params, batch):
  return tl.loss_fn(jax.tree.map(lambda x: x.astype(jnp.float32), params), batch)


def test_bf16_lean_step_with_microbatches_on_a_mesh_matches_one_device():
  mesh = mesh_of("2x4 data-tensor")
  base = bf16_params()
  shardings = sh.param_shardings(base, mesh, RULES)
  mask = spra.sample_mask(jax.random.key(0), jax.device_put(base, shardings), density=DENSITY, **TRAIN)
  step = sh.sharded_lean_step(bf16_loss, adamw(), microbatches=2)
  state = step.init(jax.device_put(base, shardings), mask)
  assert state.base is not None
  layout = step.state_shardings
  ref_step = spra.lean_step(bf16_loss, adamw(), microbatches=2)
  ref = ref_step.init(one_device(base), one_device(mask))
  for batch in tl.batches(4):
    state, loss = jax.block_until_ready(step(state, jax.device_put(batch, sh.batch_sharding(mesh))))
    ref, ref_loss = jax.block_until_ready(ref_step(ref, one_device(batch)))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_same_layout(state, layout)  # the base entries keep the deltas' shardings step after step
  state, ref = jax.block_until_ready(step.flush(state)), ref_step.flush(ref)
  # Adam's normalised steps carry the cross-device summation order's rounding (a few 1e-5 over 4 steps at lr 5e-3).
  for x, y in zip(jax.tree.leaves(state.delta.values), jax.tree.leaves(ref.delta.values)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)
  # On the mesh as on one device, the bf16 weights are round(base + delta), bit for bit.
  merged = spra.merge(one_device(base), one_device(state.delta))
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_masked_masters_are_sharded_and_the_update_needs_no_collectives():
  mesh = mesh_of("1x8 fsdp")
  base = bf16_params()
  shardings = sh.param_shardings(base, mesh, RULES)
  params = jax.device_put(base, shardings)
  tx = spra.masked(optax.adamw(1e-3), density=DENSITY, key=0, **TRAIN)
  state = tx.init(params)
  assert state.masters is not None
  state_shardings = sh.opt_state_shardings(state, shardings)
  state = jax.device_put(state, state_shardings)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update, out_shardings=(shardings, state_shardings))
  hlo = update.lower(grads, state, params).compile().as_text()
  assert count_collectives(hlo) == [], count_collectives(hlo)
  updates, new_state = update(grads, state, params)
  assert_same_layout(new_state, state_shardings)
  new_params = optax.apply_updates(params, updates)
  masks = jax.tree.leaves(spra.mask_of(new_state), is_leaf=spra.masks.is_leaf_mask)
  masters = jax.tree.leaves(new_state.masters)
  assert len(masters) == sum(m.kind != "frozen" for m in masks)
  for m, w, mu in zip([m for m in masks if m.kind != "frozen"],
                      [w for w, m in zip(jax.tree.leaves(new_params), masks) if m.kind != "frozen"], masters):
    got = np.asarray(w).reshape(-1)[np.asarray(m.indices)] if m.kind == "sparse" else np.asarray(w).reshape(-1)
    np.testing.assert_array_equal(got, np.asarray(mu.astype(jnp.bfloat16)).reshape(-1))
