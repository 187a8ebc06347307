"""Checkpoint and resume: a SpaRTA run cut short and resumed matches an uninterrupted run bit for bit.

An explicit training loop over MiniLM with the Optax transformation
``spra.masked(optax.adamw(...))``, checkpointed with
``spra.checkpoint.TrainCheckpointer``. A checkpoint holds only what a resume
needs: the trained entries of the weights (``trained_entries``: k values, not
the 22.7 M of the model), the optimizer state (which carries the mask), the
step, the position in the data stream and the loss history.

The script runs the same fine-tuning three ways:

1. uninterrupted, ``--steps`` steps;
2. into ``--output``, saving every ``--checkpoint-every`` steps, and stopped
   after ``--crash-after`` steps: everything in memory is dropped, as in a crash;
3. resumed from ``--output`` alone: the pretrained base weights, the latest
   checkpoint and the data stream from the saved position, on to ``--steps``.

It then compares the per-step losses, the final weights and the optimizer
state of runs 1 and 3: they are identical, not merely close. (The fine-tuning
job does the same with ``spra-jax finetune ... --resume``, even after SIGKILL.)

Run:
  python examples/resume.py --steps 20 --checkpoint-every 5 --crash-after 13 --output runs/resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import spra_jax as spra
from spra_jax.checkpoint import TrainCheckpointer, trained_entries, with_trained_entries


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="minilm")
  ap.add_argument("--dataset", default="rotten-tomatoes")
  ap.add_argument("--density", type=float, default=0.01)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--checkpoint-every", type=int, default=5)
  ap.add_argument("--crash-after", type=int, default=13, help="stop the second run after this many steps")
  ap.add_argument("--lr", type=float, default=1e-2)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--max-length", type=int, default=32)
  ap.add_argument("--train-examples", type=int, default=2000, help="training examples used (0: the whole split)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--output", default="runs/resume", help="the interrupted run's directory (emptied first)")
  args = ap.parse_args(argv)
  if not 0 < args.crash_after < args.steps or args.crash_after < args.checkpoint_every:
    ap.error("need checkpoint-every <= crash-after < steps, so that the stopped run leaves a checkpoint")
  return args


class Run:
  """The fine-tuning setup every run shares: base weights, mask, optimizer, jitted step, data."""

  def __init__(self, args):
    self.args = args
    model, tokenizer = spra.models.from_pretrained(args.model, task="sequence-classification", num_labels=2,
                                                   seed=args.seed)
    self.graphdef, self.base, self.rest = nnx.split(model, nnx.Param, ...)
    train = spra.data.load(args.dataset, seed=args.seed)["train"]
    train = train.select(range(min(args.train_examples, len(train)))) if args.train_examples else train
    self.arrays = spra.data.tokenize_classification(train, tokenizer, max_length=args.max_length)
    rules = spra.models.presets.get("paper", "bert", task="sequence-classification")
    self.mask = spra.sample_mask(jax.random.key(args.seed), self.base, density=args.density, **rules)
    self.tx = spra.masked(optax.adamw(optax.cosine_decay_schedule(args.lr, args.steps)), self.mask)

    def loss_fn(params, batch):
      logits = nnx.merge(self.graphdef, params, self.rest)(batch["input_ids"], attention_mask=batch["attention_mask"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    @jax.jit
    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.step = step

  def start(self):
    """A fresh run: the base weights (never modified: each step returns new arrays) and a new optimizer state."""
    return self.base, self.tx.init(self.base), 0, spra.data.Position(), []

  def train(self, params, opt_state, done, position, losses, *, until, ckpt=None):
    """Steps ``done + 1 .. until`` from ``position``; with ``ckpt``, saves every ``checkpoint_every`` steps."""
    stream = spra.data.batches(self.arrays, self.args.batch_size, seed=self.args.seed, start=position)
    losses = list(losses)
    for step in range(done + 1, until + 1):
      position, batch = next(stream)
      params, opt_state, loss = self.step(params, opt_state, batch)
      losses.append(float(loss))
      if ckpt is not None and step % self.args.checkpoint_every == 0:
        state = {"entries": trained_entries(params, self.mask), "opt_state": opt_state}
        ckpt.save(step, state, data_position=dataclasses.asdict(position), metadata={"losses": losses})
    return params, opt_state, losses

  def resume(self, directory: pathlib.Path):
    """The latest checkpoint in ``directory``, on top of the base weights."""
    like = {"entries": trained_entries(self.base, self.mask), "opt_state": self.tx.init(self.base)}
    with TrainCheckpointer(directory) as ckpt:
      restored = ckpt.restore(like)
    params = with_trained_entries(self.base, self.mask, restored.state["entries"])
    position = spra.data.Position(**restored.data_position)
    return params, restored.state["opt_state"], restored.step, position, restored.metadata["losses"]


def identical(a: Any, b: Any) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  t0 = time.perf_counter()
  run = Run(args)
  print(f"SpaRTA on {args.dataset}: {spra.num_trainable(run.mask):,} trainable entries, {args.steps} steps")

  straight_params, straight_opt, straight_losses = run.train(*run.start(), until=args.steps)
  print(f"uninterrupted: {args.steps} steps, final loss {straight_losses[-1]:.6f}")

  out = pathlib.Path(args.output)
  shutil.rmtree(out, ignore_errors=True)
  with TrainCheckpointer(out / "checkpoints", max_to_keep=2) as ckpt:
    run.train(*run.start(), until=args.crash_after, ckpt=ckpt)
  saved = TrainCheckpointer(out / "checkpoints")
  steps_on_disk = saved.all_steps()
  saved.close()
  print(f"stopped after step {args.crash_after}; checkpoints on disk: steps {steps_on_disk}")

  params, opt_state, done, position, losses = run.resume(out / "checkpoints")
  print(f"resumed from step {done} (data position epoch {position.epoch}, batch {position.batch})")
  params, opt_state, losses = run.train(params, opt_state, done, position, losses, until=args.steps)

  report = {
      "steps": args.steps, "crash_after": args.crash_after, "resumed_from": done, "checkpoints": steps_on_disk,
      "losses_identical": losses == straight_losses,
      "weights_identical": identical(params, straight_params),
      "opt_state_identical": identical(opt_state, straight_opt),
      "max_abs_weight_difference": max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                       for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(straight_params))),
      "final_loss": losses[-1], "seconds": time.perf_counter() - t0,
  }
  print("| | uninterrupted | stopped + resumed |")
  print("|---|---|---|")
  for step in sorted({1, done, done + 1, args.steps}):
    print(f"| loss at step {step} | {straight_losses[step - 1]:.9f} | {losses[step - 1]:.9f} |")
  print(json.dumps({k: report[k] for k in ("resumed_from", "losses_identical", "weights_identical",
                                           "opt_state_identical", "max_abs_weight_difference")}))
  return report


if __name__ == "__main__":
  main()
