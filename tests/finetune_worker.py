"""A fine-tuning run in its own process, through the command line: python finetune_worker.py ARGS... .

ARGS are ``spra-jax finetune`` options (``--resume`` included); the model is a
small bag-of-words classifier handed to the command (``--model`` only names
it). Each step sleeps ``SPRA_WORKER_STEP_SLEEP`` seconds (default 0.1) so that
a test can interrupt or kill the process between steps. The worker prints
``worker: ready`` once its imports are done, for tests that time their kills.
"""

import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from spra_jax import cli, data, recipes


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


def write_reviews_csv(path) -> None:
  """600 real Rotten Tomatoes snippets as a local CSV with string labels (the job's local-file path)."""
  ds = data.load("rotten-tomatoes", seed=0)["train"].select(range(600))
  ds.to_pandas()[["text", "label"]].assign(label=lambda d: d.label.map({0: "rotten", 1: "fresh"})).to_csv(path, index=False)


def cli_args(config) -> list[str]:
  """The ``spra-jax finetune`` options that give ``config`` (a FinetuneConfig), every field spelled out."""
  args = []
  for name, value in vars(config).items():
    if value is None and name == "preset":
      value = "none"
    if value is not None:
      args += [f"--{name.replace('_', '-')}", str(value)]
  return args


def main(argv):
  tokenizer = transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  pause = float(os.environ.get("SPRA_WORKER_STEP_SLEEP", "0.1"))
  original = recipes.Run.step

  def slow(self, state, batch):
    time.sleep(pause)
    return original(self, state, batch)

  recipes.Run.step = slow  # every method steps through a Run
  model = BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0))
  print("worker: ready", flush=True)
  prog = shlex.join([sys.executable, os.path.abspath(__file__)])
  argv = argv[1:] if argv[:1] == ["finetune"] else argv  # the resume command it prints names the subcommand
  return cli.main(["finetune", *argv], prog=prog, model=model, tokenizer=tokenizer)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
