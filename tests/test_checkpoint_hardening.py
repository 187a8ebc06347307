"""Checkpoints under bad input: zero-entry leaves, failed saves, bad steps and metadata, dtype mismatches, edited
adapter tables, non-finite values, killed saves' staging directories, and stderr after a caught error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax.checkpoint import TrainCheckpointer, load_dense_adapter, save_dense_adapter
from spra_jax.checkpoint import _files
from spra_jax.masks import LeafMask

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """Runs ``script`` in a fresh interpreter on the CPU, bounded by ``timeout`` (a hang fails the test)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True,
                        text=True, timeout=timeout)


def _params():
  return {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 64, "b": jnp.zeros(3)}


def _empty_leaf_mask():
  # 'b' is a sparse leaf with no entries, as a hand-built (or older sampled) mask can have.
  return {"w": LeafMask.sparse((8, 8), jnp.array([1, 5, 9, 40], jnp.int32)),
          "b": LeafMask.sparse((3,), jnp.zeros((0,), jnp.int32))}


def _loss(p, x):
  return jnp.sum((p["w"] @ x) ** 2) + jnp.sum(p["b"] * 2.0)


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------
# 1. Zero-entry leaves; failed saves let the process exit.
# --------------------------------------------------------------------------


def test_masked_state_with_a_zero_entry_leaf_saves_restores_and_resumes_bit_identically(tmp_path):
  tx = spra.masked(optax.adam(1e-2), _empty_leaf_mask())
  x = jnp.linspace(-1.0, 1.0, 8)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(_loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = _params(), tx.init(_params())
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    for i in range(1, 7):
      params, opt_state = step(params, opt_state)
      if i == 3:
        assert ckpt.save(i, {"params": params, "opt_state": opt_state}) is True
        ckpt.wait_until_finished()
    reference = {"params": params, "opt_state": opt_state}

    # A fresh like: another mask with the same number of entries per leaf; the indices come from the checkpoint.
    other = {"w": LeafMask.sparse((8, 8), jnp.array([0, 2, 3, 4], jnp.int32)),
             "b": LeafMask.sparse((3,), jnp.zeros((0,), jnp.int32))}
    like = {"params": _params(), "opt_state": spra.masked(optax.adam(1e-2), other).init(_params())}
    restored = ckpt.restore(like)
  assert restored.step == 3
  mask_b = restored.state["opt_state"].mask["b"]
  assert mask_b.kind == "sparse" and mask_b.indices.shape == (0,) and mask_b.indices.dtype == jnp.int32
  params, opt_state = restored.state["params"], restored.state["opt_state"]
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  _assert_trees_equal({"params": params, "opt_state": opt_state}, reference)


def test_lean_state_with_a_zero_entry_leaf_saves_restores_and_resumes_bit_identically(tmp_path):
  x = jnp.linspace(-1.0, 1.0, 8)
  lean = spra.lean_step(_loss, optax.adam(1e-2), donate=False)
  state = lean.init(_params(), _empty_leaf_mask())
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    for i in range(1, 5):
      state, _ = lean(state, x)
      if i == 2:
        ckpt.save(i, {"lean": state}, rng=jax.random.key(7))
        ckpt.wait_until_finished()
    reference = lean.flush(state)
    restored = ckpt.restore({"lean": lean.init(_params(), _empty_leaf_mask())}, base_params=_params())
  assert restored.step == 2 and restored.state["lean"].delta.values["b"].shape == (0,)
  state = restored.state["lean"]
  for _ in range(2):
    state, _ = lean(state, x)
  _assert_trees_equal(lean.flush(state), reference)


@pytest.mark.parametrize("encoding", ["int32", "gaps"])
def test_adapters_with_zero_entry_leaves_round_trip_with_their_dtypes(tmp_path, encoding):
  # 'z' is the only bfloat16 leaf and has no entries, so no stored array holds its dtype.
  mask = {"w": LeafMask.sparse((8, 8), jnp.array([1, 5], jnp.int32)), "z": LeafMask.sparse((3,), jnp.zeros((0,), jnp.int32))}
  delta = spra.SparseDelta(mask, {"w": jnp.array([1.5, -2.0]), "z": jnp.zeros((0,), jnp.bfloat16)})
  loaded = spra.load_adapter(spra.save_adapter(tmp_path / "a", delta, index_encoding=encoding))
  assert loaded.values["z"].dtype == jnp.bfloat16 and loaded.values["z"].shape == (0,)
  assert loaded.mask["z"].kind == "sparse" and loaded.mask["z"].indices.dtype == jnp.int32
  _assert_trees_equal(loaded, delta)


def test_deleted_arrays_are_refused_before_orbax_sees_them(tmp_path):
  x = jnp.ones(4) + 1
  x.delete()
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(ValueError, match=r"state leaf 'opt/mu' has been deleted \(donated to a jitted step\?\)"):
      ckpt.save(1, {"opt": {"mu": x}})
    assert ckpt.all_steps() == []


def _fail_inside_orbax(*args, **kwargs):
  raise ValueError("simulated storage failure")


# A failure inside Orbax's save after it has started its background work for the step (where its zero-size check
# failed): Orbax's own array check is made to raise.
FAILING_SAVE = """
import sys, jax.numpy as jnp
import spra_jax as spra
from orbax.checkpoint._src.serialization import jax_array_handlers

def failing(*args, **kwargs):
  raise ValueError("simulated storage failure")
jax_array_handlers.check_array_values = failing

ckpt = spra.checkpoint.TrainCheckpointer(sys.argv[1])
try:
  ckpt.save(1, {"w": jnp.ones(4)})
except ValueError as e:
  print("caught:", e, flush=True)
sys.exit(3)  # no close(): the interpreter must still exit
"""


def test_a_save_that_fails_inside_orbax_leaves_a_process_that_exits(tmp_path):
  proc = _run(FAILING_SAVE, str(tmp_path / "ck"), timeout=90)  # a hang is a TimeoutExpired
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert "caught: simulated storage failure" in proc.stdout


def test_the_checkpointer_stays_usable_after_a_save_failed_inside_orbax(tmp_path, monkeypatch):
  from orbax.checkpoint._src.serialization import jax_array_handlers

  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    with monkeypatch.context() as patch:
      patch.setattr(jax_array_handlers, "check_array_values", _fail_inside_orbax)
      with pytest.raises(ValueError, match="simulated storage failure"):
        ckpt.save(1, {"w": jnp.ones(4)})
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert ckpt.save(1, {"w": jnp.full(4, 2.0)}) is True
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1] and float(ckpt.restore({"w": jnp.zeros(4)}).state["w"].sum()) == 8.0


# --------------------------------------------------------------------------
# 2-4. Metadata, steps, dtypes.
# --------------------------------------------------------------------------


def test_non_json_metadata_raises_type_error_before_anything_is_written(tmp_path):
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(TypeError, match=r"metadata\['config'\]\['when'\] is a object, which cannot be stored as JSON"):
      ckpt.save(1, {"w": jnp.ones(2)}, metadata={"config": {"when": object()}})
    with pytest.raises(TypeError, match=r"data_position\['seen'\] is a set"):
      ckpt.save(1, {"w": jnp.ones(2)}, data_position={"seen": {1, 2}})
    with pytest.raises(TypeError, match="metadata must be a dict of JSON values, got list"):
      ckpt.save(1, {"w": jnp.ones(2)}, metadata=[1])
    assert ckpt.all_steps() == [] and sorted(os.listdir(tmp_path / "ck")) == []
    # numpy scalars have a JSON form: accepted, and restored as plain numbers.
    assert ckpt.save(1, {"w": jnp.ones(2)}, data_position={"batch": np.int64(5)}, metadata={"lr": np.float32(0.5)})
    ckpt.wait_until_finished()
    restored = ckpt.restore({"w": jnp.zeros(2)})
  assert restored.data_position == {"batch": 5} and restored.metadata == {"lr": 0.5}


def test_same_older_and_negative_steps_raise_and_only_the_interval_skips(tmp_path):
  state = {"w": jnp.ones(2)}
  with TrainCheckpointer(tmp_path / "ck", save_interval_steps=5) as ckpt:
    assert ckpt.save(5, state) is True
    ckpt.wait_until_finished()
    with pytest.raises(ValueError, match=r"checkpoint step 5 already exists in .* \(it has steps \[5\]\); save a later"):
      ckpt.save(5, state)
    with pytest.raises(ValueError, match=r"step 3 is older than the latest checkpoint, step 5, .* increasing step order"):
      ckpt.save(3, state, force=True)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
      ckpt.save(-1, state)
    with pytest.raises(TypeError, match="step must be an int, got float 7.5"):
      ckpt.save(7.5, state)
    assert ckpt.save(7, state) is False  # the policy the caller chose: not a multiple of 5
    assert ckpt.save(7, state, force=True) is True
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5, 7]


def test_restoring_into_another_dtype_raises_unless_cast(tmp_path):
  state = {"opt": {"mu": jnp.linspace(0, 1, 6, dtype=jnp.float32)}, "count": jnp.array(3, jnp.int32)}
  with TrainCheckpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    like = {"opt": {"mu": jnp.zeros(6, jnp.bfloat16)}, "count": jnp.array(0, jnp.int32)}
    with pytest.raises(ValueError, match=r"checkpoint 1 in .* does not fit the like tree: 'opt/mu' is stored as "
                                         r"float32, like asks for bfloat16; .* pass cast=True to convert it"):
      ckpt.restore(like)
    with pytest.raises(ValueError, match=r"'opt/mu' is stored with shape \(6,\), like has \(3,\)"):
      ckpt.restore({"opt": {"mu": jnp.zeros(3)}, "count": jnp.array(0, jnp.int32)})
    with pytest.raises(ValueError, match=r"like has leaves the checkpoint does not: \['extra'\]"):
      ckpt.restore({**state, "extra": jnp.zeros(1)})
    cast = ckpt.restore(like, cast=True).state
  assert cast["opt"]["mu"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(cast["opt"]["mu"], state["opt"]["mu"].astype(jnp.bfloat16))


# --------------------------------------------------------------------------
# 5-6. Adapter tables, non-finite values.
# --------------------------------------------------------------------------


def _two_leaf_delta():
  mask = {"a": LeafMask.sparse((4, 6), jnp.array([0, 7, 23], jnp.int32)),
          "c": LeafMask.sparse((4, 6), jnp.array([1, 2, 3], jnp.int32))}
  return spra.SparseDelta(mask, {"a": jnp.array([1.0, 2.0, 3.0]), "c": jnp.array([4.0, 5.0, 6.0])})


def _edit(directory: Path, fn) -> None:
  path = directory / "adapter_config.json"
  cfg = json.loads(path.read_text())
  fn(cfg)
  path.write_text(json.dumps(cfg))


def test_sparse_table_checksum_catches_same_size_shape_edits_and_path_swaps(tmp_path):
  saved = spra.save_adapter(tmp_path / "a", _two_leaf_delta())
  assert len(spra.load_adapter_config(saved)["table_sha256"]) == 64

  def row(cfg, path):
    return next(r for r in cfg["leaves"] if r["path"] == path)

  def swap(cfg):
    ra, rc = row(cfg, "a"), row(cfg, "c")
    ra["path"], rc["path"] = rc["path"], ra["path"]
    ra["keypath"], rc["keypath"] = rc["keypath"], ra["keypath"]

  for name, fn in [("shape", lambda cfg: row(cfg, "a").update(shape=[6, 4])), ("swap", swap)]:
    d = shutil.copytree(saved, tmp_path / name)
    _edit(d, fn)
    with pytest.raises(ValueError, match=r"is corrupted: its adapter_config.json does not match its table_sha256"):
      spra.load_adapter(d)

  # An adapter written before the checksum existed (none in its config) still loads, bit-identical.
  d = shutil.copytree(saved, tmp_path / "v1")
  _edit(d, lambda cfg: cfg.pop("table_sha256"))
  _assert_trees_equal(spra.load_adapter(d), spra.load_adapter(saved))


def test_edited_and_unknown_index_encodings_are_value_errors(tmp_path):
  saved = spra.save_adapter(tmp_path / "a", _two_leaf_delta())
  for encoding, message in [("gaps", r"row 0 of its leaf table is malformed"),
                            ("zstd", r"has index_encoding 'zstd'; this spra_jax \(.*\) reads 'int32' and 'gaps'")]:
    d = shutil.copytree(saved, tmp_path / encoding)
    _edit(d, lambda cfg: cfg.update(index_encoding=encoding))
    with pytest.raises(ValueError, match=message):
      spra.load_adapter(d)


def test_dense_table_checksum_catches_a_path_swap(tmp_path):
  saved = save_dense_adapter(tmp_path / "a", {"x": jnp.zeros((2, 3)), "y": jnp.ones((2, 3))})

  def swap(cfg):
    rx, ry = cfg["leaves"]
    rx["path"], ry["path"], rx["keypath"], ry["keypath"] = ry["path"], rx["path"], ry["keypath"], rx["keypath"]

  d = shutil.copytree(saved, tmp_path / "swap")
  _edit(d, swap)
  with pytest.raises(ValueError, match="does not match its table_sha256"):
    load_dense_adapter(d)
  _edit(d, lambda cfg: cfg.pop("table_sha256"))  # without the checksum (an older adapter) the swap would load
  assert float(load_dense_adapter(d)[0]["x"].sum()) == 6.0


def test_non_finite_values_warn_naming_the_leaves(tmp_path):
  delta = _two_leaf_delta()
  delta = delta.replace(values={"a": jnp.array([jnp.nan, 2.0, jnp.inf]), "c": delta.values["c"]})
  with pytest.warns(UserWarning, match=r"save_adapter: the delta has non-finite values in 1 leaf: 'a' \(1 NaN, 1 inf "
                                       r"of 3\); they are saved as they are"):
    spra.save_adapter(tmp_path / "a", delta)
  loaded = spra.load_adapter(tmp_path / "a")
  assert np.isnan(loaded.values["a"][0]) and np.isinf(loaded.values["a"][2])
  with pytest.warns(UserWarning, match=r"save_dense_adapter: variables has non-finite values in 1 leaf: 'k' \(2 NaN"):
    save_dense_adapter(tmp_path / "d", {"k": jnp.full((2,), jnp.nan, jnp.bfloat16), "ok": jnp.ones(2)})


# --------------------------------------------------------------------------
# 7. Staging directories of killed saves.
# --------------------------------------------------------------------------


def _dead_pid() -> int:
  """The pid of a process that has exited (a trivial child, waited for): what a kill -9 leaves behind."""
  child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         timeout=60, check=True)
  return int(child.stdout)


def test_the_next_save_removes_staging_left_by_killed_saves_only(tmp_path):
  target = tmp_path / "adapter"
  # A killed save's staging directory, named as save_adapter names them (host, pid, random), half written.
  killed = target.parent / f".adapter.tmp-{_files._host_tag()}-{_dead_pid()}-{'e' * 12}"
  (killed / "arrays").mkdir(parents=True)
  live = target.parent / f".adapter.tmp-{_files._host_tag()}-{os.getpid()}-{'a' * 12}"  # a save in this process
  foreign = target.parent / f".adapter.tmp-{'0' * 8}-1-{'b' * 12}"  # another host's, fresh: its pid means nothing
  legacy = target.parent / f".adapter.tmp-{'c' * 12}"  # an unnamed one of an older version, two days old
  replaced = target.parent / f".adapter.replaced-{'d' * 12}"  # may hold the only copy after a crashed replace
  other = target.parent / f".adapter2.tmp-{_files._host_tag()}-{_dead_pid()}-{'f' * 12}"  # another destination's
  for d in (live, foreign, legacy, replaced, other):
    d.mkdir()
  old = time.time() - 2 * 24 * 3600
  os.utime(legacy, (old, old))

  spra.save_adapter(target, spra.init_delta(spra.sample_mask(0, {"w": jnp.zeros((4, 4))}, density=0.5)))
  assert sorted(p.name for p in _files.leftovers(target)) == sorted(p.name for p in (live, foreign, replaced))
  assert other.is_dir() and spra.load_adapter(target).mask["w"].num_trainable == 8
  save_dense_adapter(target.parent / "adapter2", {"w": jnp.ones(2)})  # the dense saver cleans alike
  assert not other.exists()


# --------------------------------------------------------------------------
# 8. Nothing reaches stderr after a caught error.
# --------------------------------------------------------------------------


CORRUPTED_LOADS = """
import gc, os, sys, jax.numpy as jnp
from pathlib import Path
import spra_jax as spra
from spra_jax.checkpoint import load_dense_adapter, save_dense_adapter

root = Path(sys.argv[1])
sparse = spra.save_adapter(root / "sparse", spra.init_delta(spra.sample_mask(0, {"w": jnp.zeros((64, 64))}, density=0.1)))
dense = save_dense_adapter(root / "dense", {f"l{i}": jnp.full((32, 32), float(i)) for i in range(8)})
for adapter in (sparse, dense):
  for mode in ("truncate", "flip"):
    for f in (adapter / "arrays" / "d").iterdir():   # every data file of the arrays, damaged
      data = bytearray(f.read_bytes())
      if mode == "truncate":
        data = data[: len(data) // 3]
      else:
        data[len(data) // 2 : len(data) // 2 + 32] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 32])
      f.write_bytes(bytes(data))
    try:
      (spra.load_adapter if adapter == sparse else load_dense_adapter)(adapter)
    except ValueError as e:
      print("caught:", str(e)[:60], flush=True)
gc.collect()
"""


def test_a_caught_load_error_of_a_corrupted_adapter_prints_nothing_to_stderr(tmp_path):
  proc = _run(CORRUPTED_LOADS, str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("caught:") == 4, proc.stdout
  assert proc.stderr == ""
