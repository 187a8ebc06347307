"""Training checkpoints: retention, exact resume after SIGKILL, LeanState and SparseMaskedState round trips."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax.checkpoint import TrainCheckpointer

PYTHON = sys.executable

# Trains two small models, one with spra.masked(optax.adamw) and one with spra.lean_step, checkpointing every
# 3 steps, and writes the final weights to OUT. It resumes from the latest checkpoint when there is one.
RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax, jax.numpy as jnp, numpy as np, optax
    import spra_jax as spra

    ckpt_dir, out, marker, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pause = float(sys.argv[5])

    def init_params():
      k = jax.random.split(jax.random.key(7), 3)
      return {"w1": jax.random.normal(k[0], (16, 32)) * 0.3, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k[1], (32, 4)) * 0.3}

    def loss_fn(p, x, y):
      h = jnp.tanh(x @ p["w1"] + p["b1"])
      return ((h @ p["w2"] - y) ** 2).mean()

    def batch(step, rng):
      kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(123), step))
      x = jax.random.normal(kx, (8, 16)) + 0.1 * jax.random.normal(rng, (8, 16))  # rng-dependent "augmentation"
      return x, jax.random.normal(ky, (8, 4))

    base = init_params()
    # Masks from a NumPy generator: no sampling program to compile in every process.
    def np_mask(seed, density):
      rng_np = np.random.default_rng(seed)
      return spra.masks.from_dense({"w1": rng_np.random((16, 32)) < density, "b1": np.ones(32, bool),
                                    "w2": rng_np.random((32, 4)) < density})

    tx = spra.masked(optax.adamw(1e-2), np_mask(0, 0.2))

    @jax.jit
    def masked_step(params, opt_state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    mask = np_mask(1, 0.1)
    lean = spra.lean_step(loss_fn, optax.adamw(1e-2))

    def fresh():
      params = jax.tree.map(jnp.copy, base)
      return {"masked": {"params": params, "opt_state": tx.init(params)},
              "lean": lean.init(jax.tree.map(jnp.copy, base), mask)}

    state, rng, start = fresh(), jax.random.key(99), 0
    ckpt = spra.checkpoint.TrainCheckpointer(ckpt_dir, max_to_keep=2, keep_every_n_steps=6)
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(jax.eval_shape(fresh), base_params=base)
      state, rng, start = restored.state, restored.rng, restored.data_position["next_step"]
      print("resumed at", start, flush=True)

    for step in range(start, total):
      if ckpt.latest_step() is not None:
        open(os.path.join(marker, f"saved-{ckpt.latest_step()}"), "w").close()
      rng, sub = jax.random.split(rng)
      x, y = batch(step, sub)
      m = state["masked"]
      params, opt_state = masked_step(m["params"], m["opt_state"], x, y)
      lean_state, _ = lean(state["lean"], x, y)
      state = {"masked": {"params": params, "opt_state": opt_state}, "lean": lean_state}
      jax.block_until_ready(state)
      if (step + 1) % 3 == 0:
        ckpt.save(step + 1, state, data_position={"next_step": step + 1}, rng=rng)
      time.sleep(pause)
    ckpt.close()
    final = lean.flush(state["lean"])
    np.savez(out, **{f"masked_{k}": np.asarray(v) for k, v in state["masked"]["params"].items()},
             **{f"lean_{k}": np.asarray(v) for k, v in final.params.items()},
             **{f"lean_delta_{k}": np.asarray(v) for k, v in final.delta.values.items() if v is not None})
    print("done", flush=True)
    """
)


def _env(cache_dir):
  env = dict(os.environ)
  env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", JAX_PLATFORMS="cpu")
  # The three processes run the same programs: share compilations through the persistent cache.
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # (XLA_FLAGS is inherited: one device and the run's compile flags, as in this process)
  # The subprocess imports spra_jax from this checkout, like the test itself.
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return env


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  script = tmp_path / "train.py"
  script.write_text(RESUME_SCRIPT)
  total = 24
  (tmp_path / "m_ref").mkdir()
  (tmp_path / "m_run").mkdir()
  env = _env(tmp_path / "jax_cache")

  def train(name, pause, **kw):
    args = [PYTHON, str(script), str(tmp_path / f"ck_{name}"), str(tmp_path / f"{name}.npz"),
            str(tmp_path / f"m_{name}"), str(total), str(pause)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

  # The uninterrupted reference run first (it fills the compilation cache), then a run that gets killed.
  ref = train("ref", 0)
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out
  run = train("run", 0.1)
  # Kill once a checkpoint beyond the first exists, i.e. mid-training with saves in flight.
  deadline = time.time() + 120
  while not (tmp_path / "m_run" / "saved-6").exists():
    assert run.poll() is None, run.stdout.read()
    assert time.time() < deadline, "the training subprocess never wrote its second checkpoint"
    time.sleep(0.02)
  run.send_signal(signal.SIGKILL)
  run.communicate()
  assert run.returncode == -signal.SIGKILL
  assert not (tmp_path / "run.npz").exists()

  resumed = train("run", 0)
  resumed_out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, resumed_out
  assert "resumed at" in resumed_out
  resumed_at = int(resumed_out.split("resumed at")[1].split()[0])
  assert 6 <= resumed_at < total
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # The runs trained: the lean delta moved off zero, and the two optimizers went different ways.
  assert np.abs(a["lean_delta_w1"]).max() > 0
  assert not np.array_equal(a["masked_w1"], a["lean_w1"])
  # Retention: the last two checkpoints plus every multiple of 6 are kept.
  kept = sorted(int(p) for p in os.listdir(tmp_path / "ck_ref") if p.isdigit())
  assert kept == [6, 12, 18, 21, 24]


def _masked_state(seed=0):
  params = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.zeros(8), "pos": jnp.arange(4)}
  tx = spra.masked(optax.adam(1e-2), density=0.25, key=seed, full="b")
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  grads["pos"] = jnp.zeros(4, jnp.int32)
  updates, opt_state = tx.update(grads, opt_state, params)
  return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}


def test_masked_state_round_trip_takes_indices_from_checkpoint(tmp_path):
  saved = _masked_state(seed=0)
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    assert ckpt.save(5, saved, metadata={"lr": 0.01}, rng=jax.random.PRNGKey(3))
    ckpt.wait_until_finished()
    # A template built with another seed has other indices (same k): they must come from the checkpoint.
    like = _masked_state(seed=1)
    got = ckpt.restore(like)
  assert got.step == 5 and got.metadata == {"lr": 0.01} and got.data_position is None
  np.testing.assert_array_equal(got.rng, jax.random.PRNGKey(3))
  saved_mask = spra.mask_of(saved["opt_state"])
  got_mask = spra.mask_of(got.state["opt_state"])
  assert not np.array_equal(spra.mask_of(like["opt_state"])["w"].indices, saved_mask["w"].indices)
  np.testing.assert_array_equal(got_mask["w"].indices, saved_mask["w"].indices)
  assert got_mask["b"].kind == "full" and got_mask["pos"].kind == "frozen"
  for x, y in zip(jax.tree.leaves(got.state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(x, y)
    assert x.dtype == y.dtype


def test_lean_state_stores_trained_entries_only(tmp_path):
  base = {"w": jax.random.normal(jax.random.key(0), (256, 256)), "b": jnp.zeros(256)}
  mask = spra.sample_mask(0, base, density=0.01, full="b")
  step = spra.lean_step(lambda p, x: ((x @ p["w"] + p["b"]) ** 2).mean(), optax.adam(1e-2))
  state = step.init(jax.tree.map(jnp.copy, base), mask)
  for _ in range(3):
    state, _ = step(state, jnp.ones((2, 256)))
  with TrainCheckpointer(tmp_path / "ck", async_save=False) as ckpt:
    ckpt.save(3, state)
    with pytest.raises(ValueError, match="base_params"):
      ckpt.restore(state)
    got = ckpt.restore(jax.eval_shape(lambda: state), base_params=base)
    ckpt.save(4, {"dense_weights": base}, force=True)  # the yardstick: the weights alone, stored the same way
  for x, y in zip(jax.tree.leaves(got.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)

  def array_bytes(step):  # the arrays' data files; metadata size depends on paths and library versions
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "ck" / str(step)) for f in fs
               if os.path.basename(r) == "d")

  # The lean state (k + 256 weight entries, Adam's moments, delta, indices: about 5 floats per trained entry)
  # takes a small fraction of the 65,792 dense weights.
  assert 0 < array_bytes(3) < 0.2 * array_bytes(4)


def test_restore_errors(tmp_path):
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
      ckpt.restore({"w": jnp.zeros(3)})
    ckpt.save(1, {"w": jnp.zeros(3)})
    ckpt.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 2 .* steps \[1\]"):
      ckpt.restore({"w": jnp.zeros(3)}, step=2)
    with pytest.raises(ValueError):
      ckpt.restore({"w": jnp.zeros(4)})


def test_save_interval_and_typed_key(tmp_path):
  with TrainCheckpointer(tmp_path / "ck", save_interval_steps=2, max_to_keep=None) as ckpt:
    saved = [ckpt.save(s, {"k": jax.random.key(s, impl="rbg")}, data_position=s) for s in range(1, 6)]
    ckpt.wait_until_finished()
    # Orbax always saves the first checkpoint of a run, then every second step.
    assert saved == [True, True, False, True, False]
    assert ckpt.all_steps() == [1, 2, 4]
    got = ckpt.restore({"k": jax.random.key(0, impl="rbg")}, step=2)
  assert str(jax.random.key_impl(got.state["k"])) == "rbg"
  np.testing.assert_array_equal(jax.random.key_data(got.state["k"]), jax.random.key_data(jax.random.key(2, impl="rbg")))
  assert got.data_position == 2
