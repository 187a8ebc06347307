"""Partition rules per model family: which model types have them, and that they split every matrix of the models."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import spra_jax as spra
from spra_jax.models import bert, hub, llama, partition


def test_rules_for_rejects_an_unknown_model_type_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"model_type='gpt2'; rules cover 'bert', 'llama', 'mistral', 'qwen2'"):
    partition.rules_for("gpt2")


def test_every_architecture_the_hub_loads_has_rules():
  assert set(hub.ARCHITECTURES) <= set(partition.FAMILIES)
  assert partition.rules_for("mistral") is partition.rules_for("qwen2") is partition.LLAMA_RULES
  assert spra.models.partition is partition


def tiny(family):
  if family == "bert":
    config = bert.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=8)
    return bert.build(config, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  # Qwen2: the Llama paths, with Q/K/V biases.
  config = llama.LlamaConfig(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, attention_bias=True)
  return llama.build(config, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_the_rules_of_a_model_split_every_matrix(family):
  model = nnx.eval_shape(lambda: tiny(family))  # shapes only: rules read paths and ranks
  rules = partition.rules_for(spra.models.model_type(model))
  specs = spra.sharding.partition_specs(nnx.state(model, nnx.Param), rules)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  assert len(flat) > 10
  replicated_matrices = [spra.masks.path_str(p) for p, s in flat if len(s) == 2 and s == P(None, None)]
  assert replicated_matrices == []
