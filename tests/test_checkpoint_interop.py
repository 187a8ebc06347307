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
  export_peft_sparta(tmp_path, delta)
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

  export_peft_sparta(tmp_path / "a", delta)
  export_peft_sparta(tmp_path / "b", delta, to_torch_layout=layout)
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
