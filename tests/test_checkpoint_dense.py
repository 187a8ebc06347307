"""Dense adapters on disk: round trips, templates, atomic replacement, damage, wrong formats, the sparse/dense divide."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax.checkpoint import load_dense_adapter, save_dense_adapter

# A failed read of a corrupted file leaves a tensorstore future whose callback may fire after its asyncio loop
# closed; that is reported (as unraisable) whenever it is collected, possibly during the next test's setup.
pytestmark = pytest.mark.filterwarnings(r"ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


def _variables(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "layers": {  # int keys, as nnx.to_pure_dict gives for a list of layers
          0: {"lora_a": jax.random.normal(k[0], (8, 2)).astype(jnp.bfloat16), "lora_b": jnp.zeros((2, 8), jnp.bfloat16)},
          1: {"lora_a": jax.random.normal(k[1], (8, 2)).astype(jnp.bfloat16), "lora_b": jnp.ones((2, 8), jnp.bfloat16)},
      },
      "head": {"kernel": jax.random.normal(k[2], (8, 3)), "bias": jnp.arange(3, dtype=jnp.float32)},
      "scale": jnp.array(0.5, jnp.float32),  # a scalar
      "steps": np.arange(4, dtype=np.int32),  # numpy leaves are fine too
      "empty": jnp.zeros((0, 4)),  # zero-size: recorded in the table only
  }


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.dtype(x.dtype) == np.dtype(y.dtype) and np.shape(x) == np.shape(y)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _edit_config(directory, edit):
  path = Path(directory) / "adapter_config.json"
  cfg = json.loads(path.read_text())
  edit(cfg)
  path.write_text(json.dumps(cfg))


def _row(cfg, path):
  return next(r for r in cfg["leaves"] if r["path"] == path)


def _largest_array_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(Path(directory) / "arrays") for f in fs]
  return Path(max(files, key=os.path.getsize))


def _hidden(parent):
  return [p for p in os.listdir(parent) if p.startswith(".")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("dense") / "adapter"
  variables = _variables()
  save_dense_adapter(directory, variables, metadata={"method": "lora", "rank": 2, "seed": np.int64(3), "dims": (8, 2)})
  return directory, variables


def _copy(saved, tmp_path, name):
  shutil.copytree(saved[0], tmp_path / name)
  return tmp_path / name


def test_round_trip_is_bit_exact_with_int_keys_bfloat16_scalars_and_empty_leaves(saved):
  directory, variables = saved
  loaded, cfg = load_dense_adapter(directory)
  _assert_bit_equal(loaded, variables)
  assert set(loaded["layers"]) == {0, 1}  # int keys stay ints
  assert loaded["layers"][0]["lora_a"].dtype == jnp.bfloat16
  assert isinstance(loaded["head"]["kernel"], jax.Array)
  assert cfg["format"] == "spra_jax.dense_adapter" and cfg["format_version"] == 1
  assert cfg["library_version"] == spra.__version__
  assert cfg["metadata"] == {"method": "lora", "rank": 2, "seed": 3, "dims": [8, 2]}
  assert cfg["trainable"] == 4 * 16 + 24 + 3 + 1 + 4
  table = {r["path"]: r for r in cfg["leaves"]}
  assert table["layers/1/lora_a"]["dtype"] == "bfloat16" and table["layers/1/lora_a"]["shape"] == [8, 2]
  assert table["empty"]["array"] is None and len(table["head/kernel"]["sha256"]) == 64
  # The JSON of the config is what load_adapter_config returns for either kind of adapter.
  assert spra.load_adapter_config(directory) == cfg


def test_lists_and_a_template_of_shapes_nnx_state_and_shardings(tmp_path):
  listed = {"blocks": [jnp.ones(2), jnp.zeros(3, jnp.float16)]}
  save_dense_adapter(tmp_path / "l", listed)
  got, _ = load_dense_adapter(tmp_path / "l")
  assert isinstance(got["blocks"], list)
  _assert_bit_equal(got, listed)

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  save_dense_adapter(tmp_path / "m", nnx.to_pure_dict(nnx.state(model, nnx.Param)), metadata={"method": "full"})
  fresh = nnx.Linear(4, 3, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16)
  state, _ = load_dense_adapter(tmp_path / "m", like=nnx.state(fresh, nnx.Param))
  nnx.update(fresh, state)
  assert fresh.kernel[...].tobytes() == model.kernel[...].tobytes()

  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16, sharding=replicated),
          "bias": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  got, _ = load_dense_adapter(tmp_path / "m", like=like)
  assert got["kernel"].sharding == replicated
  assert got["bias"].tobytes() == model.bias[...].tobytes()


def test_template_mismatches_are_named(saved):
  directory, variables = saved
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)
  _assert_bit_equal(load_dense_adapter(directory, like=shapes)[0], variables)

  fewer = dict(shapes, head={"kernel": shapes["head"]["kernel"]})
  with pytest.raises(ValueError, match=r"adapter leaves it lacks: \['head/bias'\]"):
    load_dense_adapter(directory, like=fewer)
  more = dict(shapes, extra=jax.ShapeDtypeStruct((2,), jnp.float32))
  with pytest.raises(ValueError, match=r"leaves the adapter does not have: \['extra'\]"):
    load_dense_adapter(directory, like=more)
  reshaped = dict(shapes, head=dict(shapes["head"], kernel=jax.ShapeDtypeStruct((3, 8), jnp.float32)))
  with pytest.raises(ValueError, match=r"template leaf 'head/kernel' has shape \(3, 8\), the adapter's has \(8, 3\)"):
    load_dense_adapter(directory, like=reshaped)
  recast = dict(shapes, head=dict(shapes["head"], kernel=jax.ShapeDtypeStruct((8, 3), jnp.bfloat16)))
  with pytest.raises(ValueError, match=r"template leaf 'head/kernel' has dtype bfloat16, the adapter's has float32"):
    load_dense_adapter(directory, like=recast)


def test_existing_directory_is_refused_then_replaced_atomically(tmp_path):
  target = tmp_path / "adapter"
  save_dense_adapter(target, {"w": jnp.ones(4)}, metadata={"run": "old"})
  (target / "stray.txt").write_text("from the old adapter")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_dense_adapter(target, {"v": jnp.zeros(2)})
  assert load_dense_adapter(target)[1]["metadata"] == {"run": "old"}
  save_dense_adapter(target, {"v": jnp.zeros(2)}, metadata={"run": "new"}, overwrite=True)
  got, cfg = load_dense_adapter(target)
  assert set(got) == {"v"} and cfg["metadata"] == {"run": "new"}
  assert not (target / "stray.txt").exists()  # the old directory was replaced as a whole, not written into
  assert _hidden(tmp_path) == []


def test_non_json_metadata_and_bad_leaves_are_refused_before_anything_is_written(tmp_path):
  with pytest.raises(TypeError, match=r"metadata\['opt'\]\['when'\] is a object"):
    save_dense_adapter(tmp_path / "a", {"w": jnp.ones(2)}, metadata={"opt": {"when": object()}})
  with pytest.raises(TypeError, match="metadata must be a dict"):
    save_dense_adapter(tmp_path / "a", {"w": jnp.ones(2)}, metadata=["method", "lora"])
  with pytest.raises(TypeError, match=r"variables leaf 'w' is a float; expected an array"):
    save_dense_adapter(tmp_path / "a", {"w": 1.0})
  with pytest.raises(TypeError, match="PRNG keys"):
    save_dense_adapter(tmp_path / "a", {"key": jax.random.key(0)})
  with pytest.raises(ValueError, match="nothing to save"):
    save_dense_adapter(tmp_path / "a", {})
  with pytest.raises(ValueError, match=r"two leaves of variables have the path 'a/b'"):
    save_dense_adapter(tmp_path / "a", {"a/b": jnp.ones(1), "a": {"b": jnp.ones(1)}})
  assert os.listdir(tmp_path) == []
  # Refused metadata leaves an existing adapter as it was, even with overwrite=True.
  save_dense_adapter(tmp_path / "b", {"w": jnp.ones(2)})
  with pytest.raises(TypeError, match="cannot be stored as JSON"):
    save_dense_adapter(tmp_path / "b", {"w": jnp.zeros(2)}, metadata={"x": {1, 2}}, overwrite=True)
  assert float(load_dense_adapter(tmp_path / "b")[0]["w"].sum()) == 2.0


def test_a_failed_save_leaves_no_temporary_directory_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
  save_dense_adapter(tmp_path / "a", {"w": jnp.ones(2)})

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(spra.checkpoint._files, "write_json", fail)
  with pytest.raises(OSError, match="disk full"):
    save_dense_adapter(tmp_path / "a", {"w": jnp.zeros(2)}, overwrite=True)
  with pytest.raises(OSError, match="disk full"):
    save_dense_adapter(tmp_path / "b", {"w": jnp.zeros(2)})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["a"]  # no .a.tmp-* or .b.tmp-*, and no b
  assert float(load_dense_adapter(tmp_path / "a")[0]["w"].sum()) == 2.0


def test_missing_pieces_are_file_not_found(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="no adapter directory"):
    load_dense_adapter(tmp_path / "nothing")
  d = _copy(saved, tmp_path, "no_config")
  os.remove(d / "adapter_config.json")
  with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
    load_dense_adapter(d)
  d = _copy(saved, tmp_path, "no_arrays")
  shutil.rmtree(d / "arrays")
  with pytest.raises(FileNotFoundError, match="arrays is missing"):
    load_dense_adapter(d)


# A failed read of a damaged array can leave an exception in the storage layer's asynchronous machinery that is
# only reported when garbage-collected; the errors this test checks are the ones load_dense_adapter raises.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_corrupted_and_edited_adapters_raise(saved, tmp_path):
  d = _copy(saved, tmp_path, "bad_json")
  text = (d / "adapter_config.json").read_text()
  (d / "adapter_config.json").write_text(text[: len(text) // 2])
  with pytest.raises(ValueError, match="truncated or corrupted"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "flipped")
  f = _largest_array_file(d)
  data = bytearray(f.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 32):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupted"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "truncated")
  f = _largest_array_file(d)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with pytest.raises(ValueError, match="truncated or corrupted|corrupted"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "checksum")
  _edit_config(d, lambda cfg: _row(cfg, "layers/0/lora_a").update(sha256="0" * 64))
  with pytest.raises(ValueError, match=r"corrupted: array 'layers/0/lora_a' does not match its checksum"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "dtype")
  _edit_config(d, lambda cfg: _row(cfg, "head/kernel").update(dtype="float16"))
  with pytest.raises(ValueError, match="does not match its checksum"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "empty_leaf")
  _edit_config(d, lambda cfg: _row(cfg, "empty").update(sha256="0" * 64))
  with pytest.raises(ValueError, match="corrupted: array 'empty' does not match its checksum"):
    load_dense_adapter(d)

  d = _copy(saved, tmp_path, "table")
  _edit_config(d, lambda cfg: cfg["leaves"][0].pop("shape"))
  with pytest.raises(ValueError, match="corrupted: row 0 of its leaf table is malformed"):
    load_dense_adapter(d)


def test_wrong_and_newer_formats(saved, tmp_path):
  d = _copy(saved, tmp_path, "newer")
  _edit_config(d, lambda cfg: cfg.update(format_version=2))
  with pytest.raises(ValueError, match=r"format version 2; this spra_jax \(.*\) reads versions up to 1. Upgrade"):
    load_dense_adapter(d)
  with pytest.raises(ValueError, match="format version 2"):
    spra.load_adapter_config(d)

  d = _copy(saved, tmp_path, "other")
  _edit_config(d, lambda cfg: cfg.update(format="someone.elses_adapter"))
  with pytest.raises(ValueError, match=r"not a spra_jax adapter config \(format 'someone.elses_adapter', expected "
                                       r"'spra_jax.dense_adapter'\)"):
    load_dense_adapter(d)
  with pytest.raises(ValueError, match="expected 'spra_jax.sparse_adapter' or 'spra_jax.dense_adapter'"):
    spra.load_adapter_config(d)

  # What the job wrote for LoRA and full fine-tuning before this format: variables/ and a JSON without a format.
  legacy = tmp_path / "legacy"
  (legacy / "variables").mkdir(parents=True)
  (legacy / "adapter_config.json").write_text(json.dumps({"method": "lora", "trainable": 12}))
  with pytest.raises(ValueError, match=r"format None.*unversioned variables/ directory.*save_dense_adapter"):
    load_dense_adapter(legacy)


def test_sparse_and_dense_loaders_name_each_other(saved, tmp_path):
  directory, _ = saved
  with pytest.raises(ValueError, match=r"is a dense adapter \(method 'lora', 9 trained variables\), not a sparse "
                                       r"one; load it with spra.checkpoint.load_dense_adapter"):
    spra.load_adapter(directory)
  with pytest.raises(ValueError, match="is a dense adapter"):
    spra.adapter_overlap(directory, directory)

  params = {"w": jnp.zeros((16, 16))}
  sparse = tmp_path / "sparse"
  spra.save_adapter(sparse, spra.init_delta(spra.sample_mask(0, params, density=0.25)))
  with pytest.raises(ValueError, match=r"is a sparse adapter \(a SparseDelta of 64 trained entries\), not a dense "
                                       r"one; load it with spra.load_adapter"):
    load_dense_adapter(sparse)
  assert spra.load_adapter_config(sparse)["format"] == "spra_jax.sparse_adapter"

  save_dense_adapter(tmp_path / "anonymous", {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"is a dense adapter \(1 trained variable\), not a sparse one"):
    spra.load_adapter(tmp_path / "anonymous")
