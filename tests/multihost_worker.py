"""One process of a local JAX cluster (or a lone process) training the tiny Llama on an fsdp=4 mesh.

  python multihost_worker.py OUT NUM_PROCESSES PROCESS_ID PORT

With NUM_PROCESSES = 2 the two processes hold 2 CPU devices each and talk over gloo
(``jax.distributed.initialize(coordinator_address="127.0.0.1:PORT")``); with 1 the lone process holds all 4. Either
way the program is the same: sample a shard-local mask on the sharded weights, validate it, run ``spra.masked`` and the
lean step (sampled weight gradients) for a few steps, blocking on every step, then ``spra.extract`` +
``spra.save_adapter`` of both, the base fingerprint included, and ``spra.load_adapter`` of what was saved. Every
process writes ``OUT/losses-<process>.json``; the adapters are written once, under ``OUT/masked`` and ``OUT/lean``,
whichever processes call the save (all of them here).
"""

import json
import os
import pathlib
import sys

DEVICES = 4
if __name__ == "__main__":  # (imported, e.g. by a doctest collection, it only defines things)
  out, num_processes, process_id, port = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // num_processes}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "multidevice"))
import tiny_llama as tl  # noqa: E402

import spra_jax as spra  # noqa: E402
from spra_jax import sharding as sh  # noqa: E402
from spra_jax.models import partition  # noqa: E402

STEPS = 4
TRAIN = dict(include=r"(kernel|embedding)$", exclude=r"lm_head", full=r"lm_head")


def global_array(host, sharding):
  """A global array from the same host value on every process (each process fills its own devices)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def main(out, num_processes, process_id):
  assert jax.device_count() == DEVICES and jax.process_count() == num_processes
  mesh = sh.make_mesh(fsdp=DEVICES)
  host_params = jax.tree.map(np.asarray, tl.init_params())
  shardings = sh.param_shardings(host_params, mesh, partition.rules_for("llama"))
  params = jax.tree.map(global_array, host_params, shardings)
  base = jax.tree.map(global_array, host_params, shardings)  # kept: the lean step updates its weights in place
  batches = [global_array(b, sh.batch_sharding(mesh)) for b in tl.batches(STEPS)]

  mask = spra.sample_mask(jax.random.key(0), params, density=0.05, **TRAIN)
  sh.check_shard_local(mask, shardings)
  spra.masks.validate(mask, params)
  tx = spra.masked(optax.adamw(5e-3, eps=1e-4), mask)
  opt_state = tx.init(params)
  train = sh.sharded_train_step(tl.loss_fn, tx, param_shardings=shardings,
                                opt_state_shardings=sh.opt_state_shardings(opt_state, shardings),
                                batch_shardings=sh.batch_sharding(mesh), donate=False)
  masked_params, losses = params, {"masked": [], "lean": []}
  for batch in batches:
    masked_params, opt_state, loss = train(masked_params, opt_state, batch)
    losses["masked"].append(float(jax.block_until_ready(loss)))

  lean = sh.sharded_lean_step(tl.loss_fn, optax.adamw(5e-3, eps=1e-4), backward="sampled")
  state = lean.init(params, mask)
  for batch in batches:
    state, loss = lean(state, batch)
    losses["lean"].append(float(jax.block_until_ready(loss)))
  state = jax.block_until_ready(lean.flush(state))

  fingerprint = spra.checkpoint.base_fingerprint(base, mask)
  spra.save_adapter(out / "masked", spra.extract(masked_params, base, mask), base_params=base)
  spra.save_adapter(out / "lean", state.delta, base_fingerprint=fingerprint, metadata={"steps": STEPS})
  loaded = spra.load_adapter(out / "lean", base_params=base)
  for a, b in zip(jax.tree.leaves(loaded.values), jax.tree.leaves(state.delta.values)):
    np.testing.assert_array_equal(np.asarray(a), spra._host.to_host(b))
  # A training checkpoint with its PRNG key, restored onto the same mesh: bit-exact.
  with spra.checkpoint.TrainCheckpointer(out / "train") as ckpt:
    ckpt.save(STEPS, state, rng=jax.random.key(7))
    ckpt.wait_until_finished()
    restored = ckpt.restore(state, base_params=base)
  assert restored.step == STEPS
  np.testing.assert_array_equal(spra._host.to_host(jax.random.key_data(restored.rng)),
                                np.asarray(jax.random.key_data(jax.random.key(7))))
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(spra._host.to_host(a), spra._host.to_host(b))
  (out / f"losses-{process_id}.json").write_text(json.dumps(losses))
  print(f"worker {process_id}/{num_processes}: done", flush=True)


if __name__ == "__main__":
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=300)
  main(out, num_processes, process_id)
