"""The ``spra-jax`` command line (also ``python -m spra_jax``).

  spra-jax finetune --model minilm --dataset rotten-tomatoes --method spra --density 0.01

runs :func:`spra_jax.finetune.finetune` and ends by printing the test metrics
and a short table. ``spra-jax finetune --help`` lists every option.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from spra_jax.finetune import METHODS, FinetuneConfig, finetune

__all__ = ["main", "parser"]


def _nullable(value: str) -> str | None:
  return None if value.lower() in ("", "none") else value


def parser() -> argparse.ArgumentParser:
  """The argument parser of ``spra-jax``."""
  defaults = FinetuneConfig()
  top = argparse.ArgumentParser(prog="spra-jax", description="SpaRTA fine-tuning for JAX.")
  commands = top.add_subparsers(dest="command", required=True)
  ft = commands.add_parser("finetune", help="fine-tune a pretrained model on a dataset",
                           description="Fine-tune a pretrained model with SpaRTA, LoRA, the head only, or fully.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ft.add_argument("--model", default=defaults.model,
                  help="local checkpoint directory, .gguf file, hub id, or alias (minilm, smollm2-135m)")
  ft.add_argument("--dataset", default=defaults.dataset,
                  help="shipped dataset (rotten-tomatoes, tweets, jeopardy), local CSV/JSON/Parquet file or hub name")
  ft.add_argument("--task", choices=("classification", "sft"), default=None,
                  help="default: sft for prompt/response or question/answer columns, else classification")
  ft.add_argument("--method", choices=METHODS, default=defaults.method)
  ft.add_argument("--density", type=float, default=defaults.density, help="fraction of eligible entries SpaRTA trains")
  ft.add_argument("--distribution", default=defaults.distribution, help="mask distribution (spra.masks.available())")
  ft.add_argument("--preset", type=_nullable, default=defaults.preset,
                  help="placement preset: paper, all-linear, mlp, attention (none: every leaf)")
  ft.add_argument("--include", default=None, help="regex of the leaves to sparsify (overrides the preset's)")
  ft.add_argument("--exclude", default=None, help="regex of leaves never to sparsify")
  ft.add_argument("--full", default=None, help="regex of leaves to train fully (default: the classification head)")
  ft.add_argument("--lr", type=float, default=defaults.lr)
  ft.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
  ft.add_argument("--steps", type=int, default=None, help="training steps (wins over --epochs)")
  ft.add_argument("--epochs", type=float, default=defaults.epochs)
  ft.add_argument("--batch-size", type=int, default=defaults.batch_size)
  ft.add_argument("--max-length", type=int, default=defaults.max_length)
  ft.add_argument("--eval-every", type=int, default=defaults.eval_every)
  ft.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                  help="validation examples per evaluation (0: all)")
  ft.add_argument("--test-examples", type=int, default=defaults.test_examples,
                  help="test examples of the final evaluation (0: all)")
  ft.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
  ft.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
  ft.add_argument("--seed", type=int, default=defaults.seed)
  ft.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,tensor=4 (default: one device)")
  ft.add_argument("--output", default=defaults.output, help="output directory")
  ft.add_argument("--resume", action="store_true", help="continue the run saved in --output")
  ft.add_argument("--overwrite", action="store_true", help="delete what --output holds and start over")
  ft.add_argument("--no-progress", action="store_true", help="no progress bar")
  return top


def summary_table(results: dict) -> str:
  """The markdown table the job ends with."""
  test = results["test"]
  rows = [("method", results.get("method", "")), ("task", results["task"])]
  rows += [(f"test {k}", f"{v:.4f}") for k, v in test.items()]
  if "majority" in results:
    rows.append(("majority-class rate (test)", f"{results['majority']:.4f}"))
  rows += [("trainable parameters", f"{results['trainable']:,} of {results['parameters']:,} "
            f"({100 * results['trainable'] / results['parameters']:.3f} %)"),
           ("optimizer state", f"{results['opt_state_bytes'] / 2**20:.2f} MiB"),
           ("steps", str(results["steps"])), ("wall time", f"{results['seconds']:.0f} s"),
           ("adapter", results["adapter"])]
  width = max(len(r[0]) for r in rows)
  return "\n".join([f"| {'':<{width}} | |", f"|{'-' * (width + 2)}|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``spra-jax``; returns the exit status."""
  args = parser().parse_args(argv)
  if args.command == "finetune":
    config = FinetuneConfig(
        model=args.model, dataset=args.dataset, task=args.task, method=args.method, density=args.density,
        distribution=args.distribution, preset=args.preset, include=args.include, exclude=args.exclude,
        full=args.full, lr=args.lr, weight_decay=args.weight_decay, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, eval_every=args.eval_every,
        eval_examples=args.eval_examples, test_examples=args.test_examples, checkpoint_every=args.checkpoint_every,
        lora_rank=args.lora_rank, seed=args.seed, mesh=args.mesh, output=args.output)
    try:
      results = finetune(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as e:
      print(f"spra-jax finetune: error: {e}", file=sys.stderr)
      return 2
    results["method"] = config.method
    test = results["test"]
    print("test " + " ".join(f"{k} {v:.4f}" for k, v in test.items()))
    print(summary_table(results))
    print(json.dumps({"results": str(results["output"]) + "/results.json"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
