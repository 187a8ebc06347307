"""Checkpoints across meshes: saved on 8 (fake CPU) devices, restored on 4 and on 1 with target shardings."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import xla_flags

import spra_jax as spra

# Runs with 8 devices: saves an adapter and a training checkpoint whose arrays are sharded over a 2x4 mesh, restores
# both onto a 4-device mesh with NamedShardings, and writes what it saved for the parent process to compare.
EIGHT_DEVICES = textwrap.dedent(
    """
    import sys, numpy as np, jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import spra_jax as spra

    out = sys.argv[1]
    assert len(jax.devices()) == 8
    mesh8 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.zeros(64)}
    params = {"w": jax.device_put(params["w"], NamedSharding(mesh8, P(None, "model"))),
              "b": jax.device_put(params["b"], NamedSharding(mesh8, P("model")))}
    mask = spra.sample_mask(0, params, density=0.125, full="b")  # k = 512 for w
    values = {"w": jax.device_put(jnp.linspace(-1, 1, 512), NamedSharding(mesh8, P(("data", "model")))),
              "b": jax.device_put(jnp.ones(64), NamedSharding(mesh8, P("model")))}
    delta = spra.SparseDelta(mask, values)
    spra.save_adapter(f"{out}/adapter", delta, base_params=params)

    tx = spra.masked(optax.adam(1e-2), mask)
    state = {"params": params, "opt_state": tx.init(params)}
    updates, opt = tx.update(jax.tree.map(jnp.ones_like, params), state["opt_state"], params)
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt}
    jax.block_until_ready(state)
    assert state["params"]["w"].sharding.spec == P(None, "model")
    with spra.checkpoint.TrainCheckpointer(f"{out}/train") as ckpt:
      ckpt.save(1, state)

    # Restore onto 4 of the devices, sharded over a (4,) mesh.
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("x",))
    on4 = NamedSharding(mesh4, P("x"))
    got = spra.load_adapter(f"{out}/adapter", shardings=on4)
    assert got.values["w"].sharding == on4 and len(got.values["w"].sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(got.values["w"]), np.asarray(values["w"]))
    np.testing.assert_array_equal(np.asarray(got.mask["w"].indices), np.asarray(mask["w"].indices))
    with spra.checkpoint.TrainCheckpointer(f"{out}/train") as ckpt:
      like = jax.eval_shape(lambda: state)
      last_axis = lambda x: NamedSharding(mesh4, P(*([None] * (x.ndim - 1)), "x") if x.ndim else P())
      shardings = jax.tree.map(last_axis, like)
      restored = ckpt.restore(like, shardings=shardings).state
    assert restored["params"]["w"].sharding.spec == P(None, "x")
    assert len(restored["params"]["w"].sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.savez(f"{out}/saved.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
    print("ok", flush=True)
    """
)


def test_save_on_8_devices_restore_on_4_and_1(tmp_path):
  script = tmp_path / "eight.py"
  script.write_text(EIGHT_DEVICES)
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr

  # This process has a single device: restore both there.
  assert len(jax.devices()) == 1
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  base = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.zeros(64)}
  delta = spra.load_adapter(tmp_path / "adapter", base_params=base, shardings=one)
  assert delta.values["w"].sharding == one
  np.testing.assert_array_equal(delta.values["w"], jnp.linspace(-1, 1, 512))

  mask = spra.sample_mask(0, base, density=0.125, full="b")
  tx = spra.masked(optax.adam(1e-2), mask)
  like = jax.eval_shape(lambda: {"params": base, "opt_state": tx.init(base)})
  with spra.checkpoint.TrainCheckpointer(tmp_path / "train") as ckpt:
    restored = ckpt.restore(like, shardings=one).state
  saved = np.load(tmp_path / "saved.npz")
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  assert len(leaves) == len(saved.files)
  # The mask was saved on a (1, 4) grid (column blocks, block-major order); like is one device's unblocked mask, so
  # the restore re-lays it: the same entries, globally sorted, and every compact vector permuted alike.
  saved_indices = next(saved[f"arr_{i}"] for i, (p, _) in enumerate(leaves) if "mask" in spra.masks.path_str(p))
  perm = np.argsort(saved_indices)
  assert restored["opt_state"].mask["w"].blocks is None
  for i, (p, x) in enumerate(leaves):
    assert x.sharding == one
    want = saved[f"arr_{i}"]
    compact = want.shape == (512,)  # w's indices and Adam moments (the dense leaves have other shapes)
    np.testing.assert_array_equal(np.asarray(x), want[perm] if compact else want,
                                  err_msg=spra.masks.path_str(p))
  assert not np.array_equal(perm, np.arange(512))  # the saved order was not the sorted one
