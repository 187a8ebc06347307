"""One process of a local JAX cluster (or a lone process) training the tiny Llama on 8 devices.

  python multihost_worker.py OUT NUM_PROCESSES PROCESS_ID PORT

With NUM_PROCESSES = 2 the two processes hold 4 CPU devices each and talk over gloo
(``jax.distributed.initialize(coordinator_address="127.0.0.1:PORT")``); with 1 the lone process holds all 8. Either
way the program is the same: sample a shard-local mask on the weights sharded over fsdp=8, validate it, run
``spra.masked`` there and the lean step (sampled weight gradients) on data=2 x tensor=4, blocking on every step, then
``spra.extract`` + ``spra.save_adapter`` of both, the base fingerprint included, ``spra.load_adapter`` of what was
saved, a training checkpoint with its PRNG key, the masked state restored onto data=2 x fsdp=4 (re-laid, shard-local),
a dense adapter and a merged export. Every process writes ``OUT/losses-<process>.json``; the adapters and exports are
written once, under ``OUT/``, whichever processes call the save (all of them here).
"""

import json
import os
import pathlib
import sys

DEVICES = 8
if __name__ == "__main__":  # (imported, e.g. by a doctest collection, it only defines things)
  out, num_processes, process_id, port = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # (the test run's compile flags, if any)
                               f"--xla_force_host_platform_device_count={DEVICES // num_processes}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "multidevice"))
import tiny_llama as tl  # noqa: E402

import spra_jax as spra  # noqa: E402
from spra_jax import sharding as sh  # noqa: E402
from spra_jax.models import partition  # noqa: E402

STEPS = 20
TRAIN = dict(include=r"(kernel|embedding)$", exclude=r"lm_head", full=r"lm_head")


def global_array(host, sharding):
  """A global array from the same host value on every process (each process fills its own devices)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def layout(shardings, host_params):
  return jax.tree.map(global_array, host_params, shardings)


def main(out, num_processes, process_id):
  assert jax.device_count() == DEVICES and jax.process_count() == num_processes
  host_params = jax.tree.map(np.asarray, tl.init_params())
  rules = partition.rules_for("llama")
  fsdp = sh.make_mesh(fsdp=DEVICES)
  shardings = sh.param_shardings(host_params, fsdp, rules)
  params = layout(shardings, host_params)
  base = layout(shardings, host_params)  # kept: the lean step updates its weights in place
  batches = [global_array(b, sh.batch_sharding(fsdp)) for b in tl.batches(STEPS)]

  mask = spra.sample_mask(jax.random.key(0), params, density=0.05, **TRAIN)
  sh.check_shard_local(mask, shardings)
  spra.masks.validate(mask, params)
  tx = spra.masked(optax.adamw(5e-3, eps=1e-4), mask)
  opt_state = tx.init(params)
  train = sh.sharded_train_step(tl.loss_fn, tx, param_shardings=shardings,
                                opt_state_shardings=sh.opt_state_shardings(opt_state, shardings),
                                batch_shardings=sh.batch_sharding(fsdp), donate=False)
  masked_params, losses = params, {"masked": [], "lean": []}
  for batch in batches:
    masked_params, opt_state, loss = train(masked_params, opt_state, batch)
    losses["masked"].append(float(jax.block_until_ready(loss)))
  fingerprint = spra.checkpoint.base_fingerprint(base, mask)
  spra.save_adapter(out / "masked", spra.extract(masked_params, base, mask), base_params=base)

  # The masked state restored onto data=2 x fsdp=4: the mask is re-laid for the new grid, shard-local there.
  with spra.checkpoint.TrainCheckpointer(out / "masked-train") as ckpt:
    ckpt.save(STEPS, opt_state, rng=jax.random.key(7))
    ckpt.wait_until_finished()
    mixed = sh.param_shardings(host_params, sh.make_mesh(data=2, fsdp=4), rules)
    like = spra.masked(optax.adamw(5e-3, eps=1e-4), density=0.05, key=jax.random.key(1), **TRAIN).init(
        layout(mixed, host_params))
    restored = ckpt.restore(like)
  moved = spra.mask_of(restored.state)
  sh.check_shard_local(moved, mixed)
  assert any(a.blocks != b.blocks for a, b in zip(jax.tree.leaves(moved, is_leaf=spra.masks.is_leaf_mask),
                                                  jax.tree.leaves(mask, is_leaf=spra.masks.is_leaf_mask))
             if a.kind == "sparse")
  np.testing.assert_array_equal(spra._host.to_host(jax.random.key_data(restored.rng)),
                                np.asarray(jax.random.key_data(jax.random.key(7))))
  before = spra.merge(layout(shardings, host_params), spra.SparseDelta(mask, opt_state.inner_state[0].mu))
  after = spra.merge(layout(mixed, host_params), spra.SparseDelta(moved, restored.state.inner_state[0].mu))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):  # the moments follow their entries
    np.testing.assert_array_equal(spra._host.to_host(a), spra._host.to_host(b))

  # The lean step on data=2 x tensor=4, from the same mask sampled for that mesh.
  tensor = sh.make_mesh(data=2, tensor=4)
  tensor_shardings = sh.param_shardings(host_params, tensor, rules)
  lean = sh.sharded_lean_step(tl.loss_fn, optax.adamw(5e-3, eps=1e-4), backward="sampled")
  lean_params = layout(tensor_shardings, host_params)
  state = lean.init(lean_params, spra.sample_mask(jax.random.key(0), lean_params, density=0.05, **TRAIN))
  sh.check_shard_local(state.delta.mask, tensor_shardings)
  for batch in tl.batches(STEPS):
    state, loss = lean(state, global_array(batch, sh.batch_sharding(tensor)))
    losses["lean"].append(float(jax.block_until_ready(loss)))
  state = jax.block_until_ready(lean.flush(state))
  tensor_base = layout(tensor_shardings, host_params)
  spra.save_adapter(out / "lean", state.delta, base_fingerprint=spra.checkpoint.base_fingerprint(
      tensor_base, state.delta.mask), metadata={"steps": STEPS})
  loaded = spra.load_adapter(out / "lean", base_params=tensor_base)
  for a, b in zip(jax.tree.leaves(loaded.values), jax.tree.leaves(state.delta.values)):
    np.testing.assert_array_equal(np.asarray(a), spra._host.to_host(b))
  # A lean checkpoint with its PRNG key, restored onto the same mesh: bit-exact.
  with spra.checkpoint.TrainCheckpointer(out / "train") as ckpt:
    ckpt.save(STEPS, state, rng=jax.random.key(7))
    ckpt.wait_until_finished()
    again = ckpt.restore(state, base_params=tensor_base)
  assert again.step == STEPS
  for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(spra._host.to_host(a), spra._host.to_host(b))

  # Dense exports of global arrays, written once: the trained head as a dense adapter, the merged model.
  spra.checkpoint.save_dense_adapter(out / "dense", {"lm_head": masked_params["lm_head"]}, metadata={"method": "full"})
  spra.checkpoint.export_merged(out / "merged", tensor_base, state.delta, config={"model_type": "llama"})
  spra.checkpoint.export_peft_sparta(out / "sparta", state.delta, base_model="local/tiny-llama")
  assert fingerprint == spra.checkpoint.base_fingerprint(params, mask)

  # Each process feeds only its share of a global batch; evaluation gathers per-row results, never the logits.
  batch_sharding = sh.batch_sharding(fsdp, 2)
  share = sh.process_rows(batch_sharding, (16, 3))
  assert (share.start, share.stop) == (16 * process_id // num_processes, 16 * (process_id + 1) // num_processes)
  rng = np.random.default_rng(0)
  arrays = {"logits": rng.normal(size=(40, 3)).astype(np.float32), "labels": rng.integers(0, 3, 40).astype(np.int32)}
  fed = []

  def predict(batch):
    fed.append(len(batch["labels"]))
    return jax.make_array_from_process_local_data(batch_sharding, batch["logits"], (16, 3))

  metrics = spra.recipes.evaluate(predict, arrays, task="classification", batch_size=16, share=share)
  assert set(fed) == {16 // num_processes}, fed
  expected = spra.metrics.classification(arrays["labels"], arrays["logits"].argmax(-1))
  assert all(abs(metrics[k] - expected[k]) < 1e-12 for k in expected), (metrics, expected)
  (out / f"losses-{process_id}.json").write_text(json.dumps(losses))
  print(f"worker {process_id}/{num_processes}: done", flush=True)


if __name__ == "__main__":
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=300)
  main(out, num_processes, process_id)
