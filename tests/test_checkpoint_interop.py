"""Interop with PyTorch: the SpaRTA package's sparse_deltas.safetensors and merged Hugging Face exports."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import spra_jax as spra
from spra_jax.checkpoint import export_merged, export_peft_sparta, import_peft_sparta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _our_leaf_name(torch_module_path: str, ndim: int) -> str:
  # The contract's convention: Linear weight -> kernel, Embedding weight -> embedding, norm weight -> scale.
  if "embed_tokens" in torch_module_path:
    return "embedding"
  if torch_module_path.endswith("norm"):
    return "scale"
  return "kernel" if ndim == 2 else "weight"


def torch_to_ours(state_dict):
  """A torch Llama state dict -> our nested-dict params (kernels [in, out])."""
  params = {}
  for name, t in state_dict.items():
    parts = name.split(".")
    a = t.detach().numpy().copy()
    if parts[-1] == "weight":
      parts[-1] = _our_leaf_name(".".join(parts[:-1]), a.ndim)
      if parts[-1] == "kernel":
        a = a.T.copy()
    node = params
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(a)
  return params


def ours_to_torch(params):
  """Our params -> {torch name: numpy array in torch layout}."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = spra.masks.path_str(p)
    out[spra.checkpoint.default_torch_name(path)] = spra.checkpoint.default_to_torch_layout(path, np.asarray(x))
  return out


@pytest.fixture(scope="module")
def llama():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, torch_dtype="float32",
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  return cfg, model


def _random_delta(mask, seed):
  leaves, treedef = jax.tree.flatten(spra.init_delta(mask).values)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return spra.SparseDelta(mask, jax.tree.unflatten(treedef, values))


def _apply_like_the_package(model, directory):
  """The SpaRTA package's loader: param[coords] = (param[coords].float() + delta).to(dtype), for every named param."""
  data = safetensors.numpy.load_file(os.path.join(directory, "sparse_deltas.safetensors"))
  with torch.no_grad():
    for name, param in model.named_parameters():
      coords = torch.from_numpy(data[f"indices.{name}"]).long().unbind(1)
      delta = torch.from_numpy(data[f"deltas.{name}"])
      param[coords] = (param[coords].float() + delta.float()).to(param.dtype)


def test_paper_format_applied_in_torch_equals_our_merge_and_merged_export(llama, tmp_path):
  cfg, model = llama
  params = torch_to_ours(model.state_dict())
  mask = spra.sample_mask(0, params, density=0.05, include=r"self_attn/(v_proj|o_proj)|mlp/down_proj", full="lm_head")
  delta = _random_delta(mask, 1)
  export_peft_sparta(tmp_path / "adapter", delta, base_model="tiny-llama", config=cfg.to_dict())

  saved = safetensors.numpy.load_file(tmp_path / "adapter" / "sparse_deltas.safetensors")
  assert saved["indices.model.layers.0.self_attn.v_proj.weight"].dtype == np.int32
  k_v0 = mask["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"].num_trainable
  assert saved["indices.model.layers.0.self_attn.v_proj.weight"].shape == (k_v0, 2)
  assert saved["indices.model.embed_tokens.weight"].shape == (0, 2)  # frozen: empty, as the package writes
  assert json.loads((tmp_path / "adapter" / "config.json").read_text())["sparta_pretrained_model"] == "tiny-llama"

  adapted = transformers.LlamaForCausalLM(cfg).eval()
  adapted.load_state_dict(model.state_dict())
  _apply_like_the_package(adapted, tmp_path / "adapter")
  ours = ours_to_torch(spra.merge(params, delta))
  theirs = {k: v.detach().numpy() for k, v in adapted.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  changed = 0
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    changed += int((theirs[name] != model.state_dict()[name].numpy()).sum())
  assert changed > 0.9 * spra.num_trainable(mask)

  # The merged export, sharded, loads in transformers with the adapted model's logits.
  export_merged(tmp_path / "merged", params, delta, config=cfg.to_dict(), max_shard_bytes=40_000)
  files = sorted(os.listdir(tmp_path / "merged"))
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
  ids = torch.tensor([[1, 5, 9, 33, 2, 60, 7, 3]])
  with torch.no_grad():
    want = adapted(ids).logits
    got = reloaded(ids).logits
    base = model(ids).logits
  torch.testing.assert_close(got, want, rtol=0, atol=0)
  assert not torch.equal(got, base)


def test_import_round_trip(llama, tmp_path):
  _, model = llama
  params = torch_to_ours(model.state_dict())
  mask = spra.sample_mask(3, params, density=0.1, include="proj", full="model/norm")
  delta = _random_delta(mask, 4)
  export_peft_sparta(tmp_path, delta, base_model="some/base")
  back = import_peft_sparta(tmp_path, jax.eval_shape(lambda: params))
  structure = lambda m: jax.tree.structure(m, is_leaf=spra.masks.is_leaf_mask)
  assert structure(back.mask) == structure(delta.mask)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(delta)):
    np.testing.assert_array_equal(a, b)
  assert back.mask["model"]["norm"]["scale"].kind == "full"
  assert back.mask["model"]["embed_tokens"]["embedding"].kind == "frozen"


def test_custom_layout_function_matches_default(tmp_path):
  params = {"fc": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)}}
  mask = spra.sample_mask(0, params, density=0.3, full="bias")
  delta = _random_delta(mask, 0)

  def layout(path, a):  # the default convention written as a plain function: goes through the generic path
    a = np.asarray(a)
    return a.T if path.endswith("kernel") and a.ndim == 2 else a

  export_peft_sparta(tmp_path / "a", delta, base_model="some/base")
  export_peft_sparta(tmp_path / "b", delta, base_model="some/base", to_torch_layout=layout)
  a = safetensors.numpy.load_file(tmp_path / "a" / "sparse_deltas.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "b" / "sparse_deltas.safetensors")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  back = import_peft_sparta(tmp_path / "b", params, to_torch_layout=layout)
  np.testing.assert_array_equal(back.mask["fc"]["kernel"].indices, delta.mask["fc"]["kernel"].indices)
  np.testing.assert_array_equal(back.values["fc"]["kernel"], delta.values["fc"]["kernel"])


def test_import_errors(tmp_path):
  params = {"fc": {"kernel": jnp.zeros((3, 2))}}
  with pytest.raises(FileNotFoundError, match="sparse_deltas.safetensors"):
    import_peft_sparta(tmp_path, params)
  f = tmp_path / "sparse_deltas.safetensors"
  write = lambda name, coords: safetensors.numpy.save_file(
      {f"indices.{name}": np.array(coords, np.int32), f"deltas.{name}": np.ones(len(coords), np.float32)}, f)
  write("other.weight", [[0, 0]])
  with pytest.raises(ValueError, match="match no parameter leaf.*other.weight"):
    import_peft_sparta(tmp_path, params)
  write("fc.weight", [[1, 2], [1, 2]])
  with pytest.raises(ValueError, match="more than once"):
    import_peft_sparta(tmp_path, params)
  write("fc.weight", [[2, 0]])
  with pytest.raises(ValueError, match=r"outside the torch shape \[2, 3\]"):
    import_peft_sparta(tmp_path, params)
  f.write_bytes(f.read_bytes()[:20])
  with pytest.raises(ValueError, match="truncated or corrupted"):
    import_peft_sparta(tmp_path, params)


def test_export_merged_refuses_existing_directory(tmp_path):
  export_merged(tmp_path / "m", {"w": jnp.ones(2)}, config={})
  with pytest.raises(FileExistsError):
    export_merged(tmp_path / "m", {"w": jnp.ones(2)}, config={})
  export_merged(tmp_path / "m", {"w": jnp.zeros(2)}, config={}, overwrite=True)
  np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")["w"], np.zeros(2))


# --------------------------------------------------------------------------
# Sequence classifiers: the head's starting value, labels, new embedding rows, bases the package cannot load.
# --------------------------------------------------------------------------


def _classifier(folder, seed):
  from flax import nnx

  model, tokenizer = spra.models.from_pretrained(folder, task="sequence-classification", num_labels=3, seed=seed)
  return model, tokenizer, nnx.state(model, nnx.Param)


def _trained_classifier_delta(params):
  rules = spra.models.presets.get("paper", "llama", task="sequence-classification")
  mask = spra.sample_mask(0, params, density=0.05, **rules)
  return _random_delta(mask, 7)


def _logits(model, params, delta, ids):
  from flax import nnx

  nnx.update(model, spra.merge(params, delta))
  try:
    return np.asarray(model(jnp.asarray(ids)))
  finally:
    nnx.update(model, params)


def test_classifier_adapter_carries_its_head_and_loads_in_the_package(tiny_llama_dir, tmp_path):
  from spra_jax.models import llama

  model, tokenizer, params = _classifier(tiny_llama_dir, seed=0)
  delta = _trained_classifier_delta(params)
  adapter = tmp_path / "adapter"
  export_peft_sparta(adapter, delta, base_model=str(tiny_llama_dir), params=params,
                     id2label={0: "neg", 1: "neu", 2: "pos"}, torch_name=llama.torch_name,
                     to_torch_layout=llama.to_torch_layout)
  cfg = json.loads((adapter / "config.json").read_text())
  assert cfg["problem_type"] == "single_label_classification" and cfg["id2label"] == {"0": "neg", "1": "neu",
                                                                                       "2": "pos"}
  head0 = safetensors.numpy.load_file(adapter / "head_init.safetensors")["head"]
  np.testing.assert_array_equal(head0, np.asarray(params["score"]["kernel"][...]).T)  # torch [labels, hidden]
  saved = safetensors.numpy.load_file(adapter / "sparse_deltas.safetensors")
  assert saved["deltas.score.weight"].shape == (3 * model.config.hidden_size,)

  ids = np.asarray([tokenizer(t)["input_ids"] for t in ["a fine film", "a dull film", "so so film"]], np.int32)
  ours = _logits(model, params, delta, ids)

  # Another seed draws another head; the adapter's head_init puts the trained head back.
  other, _, other_params = _classifier(tiny_llama_dir, seed=1)
  back = import_peft_sparta(adapter, other_params, torch_name=llama.torch_name, to_torch_layout=llama.to_torch_layout)
  np.testing.assert_allclose(_logits(other, other_params, back, ids), ours, atol=1e-5)
  (adapter / "head_init.safetensors").rename(tmp_path / "aside.safetensors")
  blind = import_peft_sparta(adapter, other_params, torch_name=llama.torch_name, to_torch_layout=llama.to_torch_layout)
  assert np.abs(_logits(other, other_params, blind, ids) - ours).max() > 0.05  # what ignoring head_init costs
  (tmp_path / "aside.safetensors").rename(adapter / "head_init.safetensors")

  peft_sparta = pytest.importorskip("peft_sparta", reason="pip install --no-deps peft-sparta==0.0.3")
  theirs = peft_sparta.SpaRTAforSequenceClassification(str(adapter))
  with torch.no_grad():
    got = theirs(torch.from_numpy(ids.astype(np.int64))).numpy()
  np.testing.assert_allclose(got, ours, atol=0.05 * np.abs(ours).max() + 1e-3)  # it computes in bfloat16
  assert theirs.decide_class(["a fine film"])[0] in {"neg", "neu", "pos"}


def test_new_embedding_rows_start_from_their_init_file(tmp_path):
  base_rows, hidden = 6, 4
  params = {"model": {"embed_tokens": {"embedding": jnp.arange(8 * hidden, dtype=jnp.float32).reshape(8, hidden)}}}
  mask = spra.masks.from_dense({"model": {"embed_tokens": {"embedding": jnp.zeros((8, hidden), bool).at[1, 2].set(
      True).at[7, 0].set(True)}}})
  delta = spra.init_delta(mask).replace(values={"model": {"embed_tokens": {"embedding": jnp.array([0.5, -1.0])}}})
  export_peft_sparta(tmp_path, delta, base_model="some/base", params=params, base_vocab_size=base_rows)
  rows = safetensors.numpy.load_file(tmp_path / "new_embeddings_init.safetensors")["new_embeddings"]
  np.testing.assert_array_equal(rows, np.asarray(params["model"]["embed_tokens"]["embedding"][base_rows:]))
  elsewhere = {"model": {"embed_tokens": {"embedding": params["model"]["embed_tokens"]["embedding"].at[6:].set(-9.0)}}}
  back = import_peft_sparta(tmp_path, elsewhere)
  merged = np.asarray(spra.merge(elsewhere, back)["model"]["embed_tokens"]["embedding"])
  want = np.asarray(spra.merge(params, delta)["model"]["embed_tokens"]["embedding"])
  np.testing.assert_allclose(merged, want, atol=1e-6)
  assert back.mask["model"]["embed_tokens"]["embedding"].num_trainable == 1 + 2 * hidden  # (1, 2) + the new rows
  with pytest.raises(ValueError, match="must hold that leaf's values"):
    import_peft_sparta(tmp_path, jax.eval_shape(lambda: elsewhere))


def test_export_refuses_what_the_package_cannot_load(tmp_path):
  import spra_jax.models.hub  # noqa: F401  (its aliases are then known)

  params = {"score": {"kernel": jnp.zeros((4, 2))}, "model": {"norm": {"scale": jnp.ones(4)}}}
  delta = spra.init_delta(spra.sample_mask(0, params, density=0.5, full="score"))
  for base, message in [(None, "needs base_model"), ("smollm2-135m", "alias of spra_jax.models"),
                        (str(tmp_path / "m.gguf"), r"\.gguf file needs gguf_file")]:
    with pytest.raises(ValueError, match=message):
      export_peft_sparta(tmp_path / "a", delta, base_model=base, params=params)
  with pytest.raises(ValueError, match=r"needs params= .* starting head"):
    export_peft_sparta(tmp_path / "a", delta, base_model="some/base")
  with pytest.raises(ValueError, match="id2label must name the head's 2 classes"):
    export_peft_sparta(tmp_path / "a", delta, base_model="some/base", params=params, id2label={0: "only"})
  with pytest.raises(ValueError, match="problem_type='single_label_classification' only"):
    export_peft_sparta(tmp_path / "a", delta, base_model="some/base", params=params,
                       config={"problem_type": "multi_label_classification"})
  assert not (tmp_path / "a").exists()  # refused before writing anything
