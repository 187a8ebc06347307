"""Sharded SpaRTA on 8 devices: shard-local masks, parity with one device, no optimizer collectives, checkpoints."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tiny_llama as tl
from conftest import load_example
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spra_jax as spra
from spra_jax import sharding as sh
from spra_jax.models import partition

# (data, fsdp, tensor): the issue's 8x1 (data), 2x4 (data x tensor) and 1x8 (fsdp) meshes.
MESHES = {"8x1 data": (8, 1, 1), "2x4 data-tensor": (2, 1, 4), "1x8 fsdp": (1, 8, 1)}
DENSITY = 0.05
STEPS = 20
TRAIN = dict(include=r"(kernel|embedding)$", exclude=r"lm_head", full=r"lm_head")
RULES = partition.rules_for("llama")  # tiny_llama has the Llama paths


def is_sharding(x):
  return isinstance(x, NamedSharding)


@functools.cache
def collectives():
  """The collectives benchmark, which owns the HLO reading (loaded on first use, once JAX has its 8 devices)."""
  return load_example("examples/benchmarks/collectives.py")


def count_collectives(hlo):
  return collectives().count_collectives(hlo)


def adamw():
  # eps=1e-4 rather than 1e-8: Adam's first step is lr * g / (|g| + eps), and a gradient entry that cancels to
  # ~1e-7 differs by several percent between two summation orders (the batch is summed across devices on a mesh):
  # with a tiny eps that rounding noise becomes a learning-rate-sized step (seen: 2.4e-5 with eps=1e-6).
  return optax.adamw(5e-3, eps=1e-4)


def mesh_of(name):
  data, fsdp, tensor = MESHES[name]
  return sh.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def one_device(tree):
  """A copy of ``tree`` on device 0 (via host memory, so nothing aliases the sharded buffers)."""
  return jax.device_put(jax.tree.map(np.asarray, tree), jax.devices()[0])


def sparse_leaves(mask):
  flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=spra.masks.is_leaf_mask)[0]
  return [(spra.masks.path_str(p), m) for p, m in flat if m.kind == "sparse"]


def assert_same_layout(tree, shardings):
  """Every array of ``tree`` is laid out as ``shardings`` says (equivalent shardings: same shards per device)."""
  arrays = jax.tree.leaves(tree)
  expected = jax.tree.leaves(shardings, is_leaf=is_sharding)
  assert len(arrays) == len(expected)
  for x, s in zip(arrays, expected):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)


def assert_trees_close(a, b, atol):
  worst = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  print(f"max |difference| {worst:.2e}")
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=spra.masks.path_str(path))


# --------------------------------------------------------------------------
# Meshes and rules.
# --------------------------------------------------------------------------


def test_make_mesh_defaults_and_errors():
  mesh = sh.make_mesh(tensor=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  sub = sh.make_mesh(fsdp=2, devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 2, "fsdp": 2, "tensor": 1} and set(sub.devices.flat) == set(jax.devices()[:4])
  with pytest.raises(ValueError, match="3 does not divide the 8 devices"):
    sh.make_mesh(tensor=3)
  with pytest.raises(ValueError, match="= 16 devices, but 8 were given"):
    sh.make_mesh(data=2, fsdp=2, tensor=4)


def test_rules_cover_llama_and_bert_paths():

  def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)

  llama = {
      "model": {"embed_tokens": {"embedding": f32(256, 64)},
                "layers": [{"self_attn": {"q_proj": {"kernel": f32(64, 64), "bias": f32(64)},
                                          "o_proj": {"kernel": f32(64, 64)}},
                            "mlp": {"up_proj": {"kernel": f32(64, 128)}, "down_proj": {"kernel": f32(128, 64)}},
                            "input_layernorm": {"scale": f32(64)}}],
                "norm": {"scale": f32(64)}},
      "score": {"kernel": f32(64, 2)},
  }
  bert = {
      "bert": {"embeddings": {"word_embeddings": {"embedding": f32(512, 64)}, "LayerNorm": {"scale": f32(64)}},
               "encoder": {"layer": [{"attention": {"self": {"value": {"kernel": f32(64, 64), "bias": f32(64)}},
                                                    "output": {"dense": {"kernel": f32(64, 64), "bias": f32(64)}}},
                                      "intermediate": {"dense": {"kernel": f32(64, 256)}},
                                      "output": {"dense": {"kernel": f32(256, 64)}}}]}},
      "classifier": {"kernel": f32(64, 3), "bias": f32(3)},
  }
  mesh = sh.make_mesh(fsdp=2, tensor=4)
  s = sh.partition_specs(llama, partition.rules_for("llama"), mesh=mesh)
  layer = s["model"]["layers"][0]
  assert s["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
  assert layer["self_attn"]["q_proj"]["bias"] == P("tensor")
  assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
  assert layer["mlp"]["up_proj"]["kernel"] == P("fsdp", "tensor")
  assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert layer["input_layernorm"]["scale"] == P(None) and s["model"]["norm"]["scale"] == P(None)
  assert s["score"]["kernel"] == P("fsdp", None)
  b = sh.partition_specs(bert, partition.rules_for("bert"), mesh=mesh)
  blayer = b["bert"]["encoder"]["layer"][0]
  assert b["bert"]["embeddings"]["word_embeddings"]["embedding"] == P("tensor", "fsdp")
  assert blayer["attention"]["self"]["value"]["kernel"] == P("fsdp", "tensor")
  assert blayer["attention"]["self"]["value"]["bias"] == P("tensor")
  assert blayer["attention"]["output"]["dense"]["kernel"] == P("tensor", "fsdp")
  assert blayer["attention"]["output"]["dense"]["bias"] == P(None)
  assert blayer["intermediate"]["dense"]["kernel"] == P("fsdp", "tensor")
  assert blayer["output"]["dense"]["kernel"] == P("tensor", "fsdp")
  assert b["bert"]["embeddings"]["LayerNorm"]["scale"] == P(None)
  # 3 labels do not split over 4 devices: that dimension stays replicated.
  assert b["classifier"]["kernel"] == P("fsdp", None) and b["classifier"]["bias"] == P(None)
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sh.partition_specs({"w": f32(4, 4)}, [(r"w", P("model"))], mesh=mesh)
  with pytest.raises(ValueError, match="has 2 entries, but leaf 'b' has shape"):
    sh.partition_specs({"b": f32(4)}, [(r"b", P("fsdp", "tensor"))])


def test_uneven_dimensions_keep_the_dividing_axes():
  mesh = sh.make_mesh(fsdp=2, tensor=4)
  spec = sh.partition_specs({"w": jnp.zeros((6, 12))}, [(r"w", P(("fsdp", "tensor"), "tensor"))], mesh=mesh)["w"]
  assert spec == P("fsdp", "tensor")  # 6 splits over fsdp=2 but not over fsdp*tensor=8


# --------------------------------------------------------------------------
# Shard-local sampling.
# --------------------------------------------------------------------------


def test_sampling_is_reproducible_without_communication_and_can_be_turned_off():
  """The same key gives the same shard-local mask (what every host computes on its own); shard_local=False opts out."""
  mesh = mesh_of("2x4 data-tensor")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tl.init_params(),
                          sh.param_shardings(tl.init_params(), mesh, RULES))
  a = spra.sample_mask(jax.random.key(3), abstract, density=DENSITY, **TRAIN)
  b = spra.sample_mask(jax.random.key(3), abstract, density=DENSITY, **TRAIN)
  for (pa, ma), (_, mb) in zip(sparse_leaves(a), sparse_leaves(b)):
    np.testing.assert_array_equal(np.asarray(ma.indices), np.asarray(mb.indices), err_msg=pa)
  plain = spra.sample_mask(jax.random.key(3), abstract, density=DENSITY, shard_local=False, **TRAIN)
  assert all(m.blocks is None and np.all(np.diff(np.asarray(m.indices)) > 0) for _, m in sparse_leaves(plain))
  with pytest.raises(ValueError, match="shard-local sampling needs the same count in every block"):
    spra.sample_mask(jax.random.key(3), abstract, "bernoulli", density=DENSITY, **TRAIN)


@pytest.mark.parametrize("shape,blocks", [((6, 8), (1, 4)), ((6, 8), (3, 2)), ((4, 6, 8), (2, 3, 2)), ((12,), (4,))])
def test_block_local_gather_and_scatter_match_flat_indexing(shape, blocks):
  size = math.prod(shape)
  x = jnp.arange(size, dtype=jnp.float32).reshape(shape) + 0.5
  # Block-major indices built with numpy: half of each block's entries, sorted within the block.
  local_shape = tuple(s // b for s, b in zip(shape, blocks))
  rng = np.random.default_rng(0)
  slices = []
  for j in range(math.prod(blocks)):
    origin = np.array(np.unravel_index(j, blocks)) * np.array(local_shape)
    local = np.sort(rng.choice(math.prod(local_shape), math.prod(local_shape) // 2, replace=False))
    coords = np.stack(np.unravel_index(local, local_shape), axis=-1) + origin
    slices.append(np.ravel_multi_index(tuple(coords.T), shape))
  indices = jnp.asarray(np.concatenate(slices), jnp.int32)
  m = spra.LeafMask.sparse(shape, indices, blocks=blocks)
  spra.masks.validate({"w": m}, {"w": x})
  idx = np.asarray(indices)
  np.testing.assert_array_equal(np.asarray(spra.compact.take(x, m)), np.asarray(x).reshape(-1)[idx])
  values = jnp.arange(len(idx), dtype=jnp.float32) + 1
  expected = np.asarray(x).reshape(-1).copy()
  expected[idx] += np.asarray(values)
  np.testing.assert_array_equal(np.asarray(spra.compact.put(x, m, values, add=True)).reshape(-1), expected)
  expected[idx] = np.asarray(values)
  np.testing.assert_array_equal(np.asarray(spra.compact.put(x, m, values)).reshape(-1), expected)
  # A slice out of its block is rejected.
  swapped = spra.LeafMask.sparse(shape, jnp.asarray(np.roll(idx, len(idx) // math.prod(blocks))), blocks=blocks)
  with pytest.raises(ValueError, match="must lie in shard block j|sorted and unique within"):
    spra.masks.validate({"w": swapped}, {"w": x})


def assert_shard_local(mask, sharded, mesh_name):
  """Each sparse leaf split by its sharding: exact k, equal counts per block, each device's slice in its shard."""
  param_by_path = {spra.masks.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
  checked = 0
  for path, m in sparse_leaves(mask):
    param = param_by_path[path]
    grid = spra.masks.block_grid(m.shape, param.sharding)
    assert m.blocks == grid
    size = math.prod(m.shape)
    n = m.num_blocks
    budget = round(DENSITY * size)
    # Exact k: the budget rounded to a multiple of the block count, the same count in every block.
    assert m.num_trainable == n * spra.masks.block_budget(budget, n, size // n)
    assert abs(m.num_trainable - budget) <= n / 2
    idx = np.asarray(m.indices)
    assert idx.dtype == np.int32 and len(np.unique(idx)) == len(idx)
    if grid is None:  # replicated parameter (pure data parallelism): an ordinary sorted mask
      assert m.blocks is None and np.all(np.diff(idx) > 0)
      continue
    checked += 1
    assert m.indices.sharding == spra.masks.compact_sharding(param.sharding)
    if m.indices_sorted:
      assert np.all(np.diff(idx) > 0)
    # Each device's slice of the indices lies inside that device's shard of the parameter.
    param_shard = {s.device: s.index for s in param.addressable_shards}
    for shard in m.indices.addressable_shards:
      local = np.asarray(shard.data)
      assert len(local) == m.num_trainable // n
      coords = np.unravel_index(local, m.shape)
      for dim, sl in enumerate(param_shard[shard.device]):
        lo, hi, _ = sl.indices(m.shape[dim])
        assert np.all((coords[dim] >= lo) & (coords[dim] < hi)), (path, shard.device)
  # Every sparse leaf (7 kernels x 2 layers + the embedding) is split unless the mesh is pure data parallel.
  assert checked == (0 if MESHES[mesh_name][1:] == (1, 1) else 15)


# --------------------------------------------------------------------------
# No collectives in the optimizer.
# --------------------------------------------------------------------------

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)")


@pytest.mark.parametrize("mesh_name", ["2x4 data-tensor", "1x8 fsdp"])
def test_optimizer_update_compiles_without_collectives(mesh_name):
  mesh = mesh_of(mesh_name)
  params = tl.init_params()
  shardings = sh.param_shardings(params, mesh, RULES)
  sharded = jax.device_put(params, shardings)
  # Door 1: spra.masked's update (gather at the mask, AdamW on compact vectors, scatter back).
  tx = spra.masked(adamw(), density=DENSITY, key=jax.random.key(0), **TRAIN)
  state = tx.init(sharded)
  state_shardings = sh.opt_state_shardings(state, shardings)
  update = jax.jit(tx.update, in_shardings=(shardings, state_shardings, shardings),
                   out_shardings=(shardings, state_shardings))
  hlo = update.lower(sharded, jax.device_put(state, state_shardings), sharded).compile().as_text()
  assert not COLLECTIVE.search(hlo), count_collectives(hlo)[:5]
  assert count_collectives(hlo) == []
  # Door 3: the lean path's optimizer part (AdamW on the delta values, in-place write of the weights).
  step = sh.sharded_lean_step(tl.loss_fn, adamw())
  lean = step.init(sharded, spra.mask_of(state))
  lean_shardings = sh.lean_state_shardings(lean, shardings)

  def optimizer_part(s, grads):
    updates, opt_state = step.tx.update(grads, s.opt_state, s.delta.values)
    params, delta = spra.apply_updates(s.params, s.delta, updates)
    return s._replace(params=params, delta=delta, opt_state=opt_state)

  part = jax.jit(optimizer_part, in_shardings=(lean_shardings, lean_shardings.pending), out_shardings=lean_shardings)
  hlo = part.lower(lean, lean.pending).compile().as_text()
  assert count_collectives(hlo) == []


# --------------------------------------------------------------------------
# Parity with one device, both doors.
# --------------------------------------------------------------------------


def run_masked(mesh_name, batches):
  mesh = mesh_of(mesh_name)
  params = tl.init_params()
  shardings = sh.param_shardings(params, mesh, RULES)
  params = jax.device_put(params, shardings)
  tx = spra.masked(adamw(), density=DENSITY, key=jax.random.key(0), **TRAIN)
  state = tx.init(params)  # (its step count is made off the mesh: the step places it)
  state_shardings = sh.opt_state_shardings(state, shardings)
  step = sh.sharded_train_step(tl.loss_fn, tx, param_shardings=shardings, opt_state_shardings=state_shardings,
                               batch_shardings=sh.batch_sharding(mesh))
  mask, losses = spra.mask_of(state), []
  sh.check_shard_local(mask, shardings)
  assert_shard_local(mask, params, mesh_name)
  mask = one_device(mask)  # keep a copy: the state's buffers are donated
  for batch in batches:
    params, state, loss = step(params, state, jax.device_put(batch, sh.batch_sharding(mesh)))
    losses.append(float(jax.block_until_ready(loss)))
  assert_same_layout((params, state), (shardings, state_shardings))
  assert step._for(1)._cache_size() == 1  # one compilation serves every step, the first one included
  return mask, losses, params


def reference_masked(mask, batches):
  tx = spra.masked(adamw(), mask)
  params = one_device(tl.init_params())
  # Committed to device 0 like the step's outputs: else the second step compiles the step again for them.
  state = jax.device_put(tx.init(params), jax.devices()[0])

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(tl.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for batch in batches:
    params, state, loss = step(params, state, one_device(batch))
    losses.append(float(jax.block_until_ready(loss)))
  return losses, params


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_masked_on_mesh_is_shard_local_and_matches_one_device(mesh_name):
  """spra.masked(key=...) initialised on sharded parameters samples shard-local masks; 20 steps equal 1 device's."""
  batches = tl.batches(STEPS)
  mask, losses, params = run_masked(mesh_name, batches)
  ref_losses, ref_params = reference_masked(mask, batches)
  print(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
  assert losses[-1] < losses[0] - 0.2  # it trains
  assert_trees_close(params, ref_params, atol=1e-5)


def run_lean(mesh, batches, mask, backward=None):
  params = tl.init_params()
  shardings = sh.param_shardings(params, mesh, RULES)
  params = jax.device_put(params, shardings)
  if mask is None:
    mask = spra.sample_mask(jax.random.key(0), params, density=DENSITY, **TRAIN)
    sh.check_shard_local(mask, shardings)
  step = sh.sharded_lean_step(tl.loss_fn, adamw(), backward=backward)
  state = step.init(params, mask)
  state_shardings = sh.lean_state_shardings(state, shardings)
  losses = []
  for batch in batches:
    state, loss = step(state, jax.device_put(batch, sh.batch_sharding(mesh)))
    losses.append(float(jax.block_until_ready(loss)))
    assert_same_layout(state, state_shardings)  # stable, step after step: nothing is resharded
  state = jax.block_until_ready(step.flush(state))
  return mask, losses, state


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_lean_on_mesh_matches_one_device(mesh_name):
  # The mesh takes the sampled weight gradients (over shard-local masks), one device the dense product.
  batches = tl.batches(STEPS)
  mask, losses, state = run_lean(mesh_of(mesh_name), batches, None, backward="sampled")
  mask1 = one_device(mask)
  step = spra.lean_step(tl.loss_fn, adamw(), backward="dense")
  ref = jax.device_put(step.init(one_device(tl.init_params()), mask1), jax.devices()[0])  # (one compilation)
  ref_losses = []
  for batch in batches:
    ref, loss = step(ref, one_device(batch))
    ref_losses.append(float(jax.block_until_ready(loss)))
  ref = step.flush(ref)
  print(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0)
  assert losses[-1] < losses[0] - 0.2
  assert_trees_close(state.params, ref.params, atol=1e-5)
  assert_trees_close(state.delta.values, ref.delta.values, atol=1e-5)
  FINAL_LEAN_STATE[mesh_name] = state


FINAL_LEAN_STATE = {}


def test_lean_step_with_explicit_shardings_equals_sharded_lean_step():
  """spra.lean_step(state_shardings=lean_state_shardings(...)) is what sharded_lean_step builds: layout and numbers."""
  mesh = mesh_of("2x4 data-tensor")
  base = jax.tree.map(np.asarray, tl.init_params())
  shardings = sh.param_shardings(base, mesh, RULES)
  placed = lambda: jax.device_put(base, shardings)  # noqa: E731  (fresh buffers: each step donates its own)
  mask = spra.sample_mask(jax.random.key(0), placed(), density=DENSITY, **TRAIN)
  # The shardings of the state, read off a state built by an unsharded, unjitted step (which moves nothing).
  layout = sh.lean_state_shardings(spra.lean_step(tl.loss_fn, adamw(), jit=False).init(placed(), mask), shardings)
  explicit = spra.lean_step(tl.loss_fn, adamw(), state_shardings=layout)
  sharded = sh.sharded_lean_step(tl.loss_fn, adamw())
  a, b = explicit.init(placed(), mask), sharded.init(placed(), mask)
  assert jax.tree.leaves(sharded.state_shardings, is_leaf=is_sharding) == jax.tree.leaves(layout, is_leaf=is_sharding)
  for batch in tl.batches(3):
    batch = jax.device_put(batch, sh.batch_sharding(mesh))
    a, loss_a = jax.block_until_ready(explicit(a, batch))
    b, loss_b = jax.block_until_ready(sharded(b, batch))
    assert float(loss_a) == float(loss_b)
    assert_same_layout(a, layout)
    assert_same_layout(b, layout)
  a, b = jax.block_until_ready(explicit.flush(a)), jax.block_until_ready(sharded.flush(b))
  assert_same_layout(a, layout)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=spra.masks.path_str(path))


# --------------------------------------------------------------------------
# Checkpoints: saved on 8 devices, restored on 1 and on 4.
# --------------------------------------------------------------------------


def test_checkpoint_saved_on_8_devices_restores_on_1_and_4(tmp_path):
  # The lean run on the 2x4 mesh above left its trained state here (else train a few steps now).
  state = FINAL_LEAN_STATE.get("2x4 data-tensor")
  if state is None:
    _, _, state = run_lean(mesh_of("2x4 data-tensor"), tl.batches(3), None)
  saved = {"delta": state.delta, "opt_state": state.opt_state}
  expected = jax.tree.map(np.asarray, saved)
  path = str(tmp_path / "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, saved)
    ckptr.wait_until_finished()
  base = tl.init_params()
  tuned = jax.tree.map(np.asarray, state.params)
  for devices, (fsdp, tensor) in ((jax.devices()[:1], (1, 1)), (jax.devices()[4:], (1, 2))):
    mesh = sh.make_mesh(fsdp=fsdp, tensor=tensor, devices=devices)
    shardings = sh.param_shardings(base, mesh, RULES)
    target = {
        "delta": sh.delta_shardings(state.delta, shardings),
        "opt_state": sh.lean_state_shardings(state, shardings).opt_state,
    }
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, target)
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path, abstract)
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
      assert set(x.sharding.device_set) == set(devices), spra.masks.path_str(p)
      np.testing.assert_array_equal(np.asarray(x), y, err_msg=spra.masks.path_str(p))
    spra.masks.validate(restored["delta"].mask, base)
    merged = jax.jit(spra.merge)(jax.device_put(base, shardings), restored["delta"])
    assert_trees_close(merged, tuned, atol=1e-6)


# --------------------------------------------------------------------------
# Restored onto another mesh: the mask re-laid for the new grid.
# --------------------------------------------------------------------------


def dense_of(mask, compact_tree):
  """Each sparse leaf's compact values scattered into a dense numpy array (order-free: compares layouts)."""
  out = {}
  for (path, m), (_, v) in zip(sparse_leaves(mask), sparse_leaves_values(mask, compact_tree)):
    dense = np.zeros(m.size, np.float32)
    dense[np.asarray(m.indices)] = np.asarray(v)
    out[path] = dense
  return out


def sparse_leaves_values(mask, tree):
  flat_m = jax.tree_util.tree_flatten_with_path(mask, is_leaf=spra.masks.is_leaf_mask)[0]
  flat_v = jax.tree.structure(mask, is_leaf=spra.masks.is_leaf_mask).flatten_up_to(tree)
  return [(spra.masks.path_str(p), v) for (p, m), v in zip(flat_m, flat_v) if m.kind == "sparse"]


def test_restore_onto_another_mesh_relays_the_mask_and_its_state(tmp_path):
  base = tl.init_params()
  old = sh.param_shardings(base, sh.make_mesh(fsdp=8), RULES)
  params = jax.device_put(base, old)
  tx = spra.masked(adamw(), density=DENSITY, key=jax.random.key(0), **TRAIN)
  opt_state = tx.init(params)
  grads = jax.grad(tl.loss_fn)(params, tl.batches(1)[0])
  updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)  # moments that differ entry by entry
  with spra.checkpoint.TrainCheckpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, {"opt_state": opt_state})
    ckpt.wait_until_finished()
    saved_mask = spra.mask_of(opt_state)
    saved_mu = dense_of(saved_mask, opt_state.inner_state[0].mu)
    expected, _ = jax.jit(tx.update)(grads, opt_state, params)  # the next update, on the old mesh

    # data=2 x fsdp=4: every new block is two old ones; re-laid, shard-local, collective-free, the same numbers.
    new = sh.param_shardings(base, sh.make_mesh(data=2, fsdp=4), RULES)
    moved = jax.device_put(base, new)
    like = spra.masked(adamw(), density=DENSITY, key=jax.random.key(1), **TRAIN).init(moved)  # another mask
    restored = ckpt.restore({"opt_state": like}).state["opt_state"]
    mask = spra.mask_of(restored)
    relaid = [(p, m.blocks) for p, m in sparse_leaves(mask) if m.blocks != dict(sparse_leaves(saved_mask))[p].blocks]
    assert relaid and all(b is not None and max(b) == 4 for _, b in relaid), relaid
    sh.check_shard_local(mask, new)
    spra.masks.validate(mask, base)
    for (p, a), (_, b) in zip(sparse_leaves(mask), sparse_leaves(saved_mask)):
      assert set(np.asarray(a.indices).tolist()) == set(np.asarray(b.indices).tolist()), p
    got_mu = dense_of(mask, restored.inner_state[0].mu)
    for p in saved_mu:
      np.testing.assert_array_equal(got_mu[p], saved_mu[p], err_msg=p)
    state_shardings = sh.opt_state_shardings(restored, new)
    assert_same_layout(spra.mask_of(restored), sh.mask_shardings(mask, new))  # the compact slices where they belong
    restored = jax.device_put(restored, state_shardings)  # (the step count: like's was on one device)
    update = jax.jit(tx.update, in_shardings=(new, state_shardings, new), out_shardings=(new, state_shardings))
    moved_grads = jax.device_put(jax.tree.map(np.asarray, grads), new)
    compiled = update.lower(moved_grads, restored, moved).compile()
    assert count_collectives(compiled.as_text()) == []
    got, _ = compiled(moved_grads, restored, moved)
    assert_trees_close(got, expected, atol=1e-7)

    # data=2 x tensor=4 splits other dimensions: the entries do not fall evenly, so the layout is kept (a warning
    # names the leaves), and the numbers are still the same; spra.sharding.relayout refuses by default.
    other = sh.param_shardings(base, sh.make_mesh(data=2, tensor=4), RULES)
    like = tx.init(jax.device_put(base, other))
    with pytest.warns(UserWarning, match="keep their old layout"):
      kept = ckpt.restore({"opt_state": like}).state["opt_state"]
    assert [m.blocks for _, m in sparse_leaves(spra.mask_of(kept))] == [m.blocks for _, m in sparse_leaves(saved_mask)]
    kept = jax.device_put(kept, sh.opt_state_shardings(kept, other))  # those leaves' compact vectors replicated
    got, _ = jax.jit(tx.update)(jax.device_put(jax.tree.map(np.asarray, grads), other), kept,
                                jax.device_put(base, other))
    assert_trees_close(got, expected, atol=1e-7)
    with pytest.raises(ValueError, match="cannot be laid out shard-locally .* per block"):
      sh.relayout(kept, other)


def test_lean_checkpoint_restores_onto_another_mesh_relaid(tmp_path):
  state = FINAL_LEAN_STATE.get("1x8 fsdp")  # trained above on fsdp=8 (else a few steps now)
  if state is None:
    _, _, state = run_lean(mesh_of("1x8 fsdp"), tl.batches(2), None)
  base = tl.init_params()
  with spra.checkpoint.TrainCheckpointer(tmp_path / "lean") as ckpt:
    ckpt.save(2, state)
    ckpt.wait_until_finished()
    new = sh.param_shardings(base, sh.make_mesh(data=2, fsdp=4), RULES)
    moved = jax.device_put(base, new)
    step = sh.sharded_lean_step(tl.loss_fn, adamw())
    like = step.init(jax.device_put(base, new), spra.sample_mask(jax.random.key(3), moved, density=DENSITY, **TRAIN))
    restored = ckpt.restore(like, base_params=moved).state
  mask, saved_mask = restored.delta.mask, state.delta.mask
  assert [m.blocks for _, m in sparse_leaves(mask)] != [m.blocks for _, m in sparse_leaves(saved_mask)]
  sh.check_shard_local(mask, new)
  assert_same_layout(restored.delta, sh.delta_shardings(restored.delta, new))
  for name in ("delta", "mu", "nu"):
    pick = (lambda s: s.delta.values) if name == "delta" else (lambda s: getattr(s.opt_state[0], name))
    got, want = dense_of(mask, pick(restored)), dense_of(saved_mask, pick(state))
    for p in want:
      np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name} {p}")
  assert_trees_close(restored.params, state.params, atol=0)  # the weights: base + delta, bit for bit
