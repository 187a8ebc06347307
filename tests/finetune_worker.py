"""A fine-tuning run in its own process, for the resume test: python finetune_worker.py CONFIG_JSON [--resume].

The model is a small bag-of-words classifier; each step sleeps briefly so that a
test can kill the process between checkpoints.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from spra_jax import data, recipes
from spra_jax import finetune as finetune_lib


class BagOfWords(nnx.Module):
  """Embeddings, mean pooling over the attention mask, a hidden layer, a classifier."""

  def __init__(self, vocab, num_labels, *, rngs):
    self.embed = nnx.Embed(vocab, 32, rngs=rngs)
    self.dense = nnx.Linear(32, 32, rngs=rngs)
    self.classifier = nnx.Linear(32, num_labels, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    m = attention_mask[..., None].astype(jnp.float32)
    pooled = (self.embed(input_ids) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return self.classifier(jax.nn.gelu(self.dense(pooled)))


def main(argv):
  config = finetune_lib.FinetuneConfig(**json.loads(argv[0]))
  tokenizer = transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  original = recipes.Run.step

  def slow(self, state, batch):
    time.sleep(0.1)
    return original(self, state, batch)

  recipes.Run.step = slow  # every method steps through a Run
  finetune_lib.finetune(config, resume="--resume" in argv, model=BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0)),
                        tokenizer=tokenizer, progress=False)


if __name__ == "__main__":
  main(sys.argv[1:])
