"""Fine-tune MiniLM on a shipped text-classification dataset with SpaRTA, through the library's fine-tuning job.

The job (``spra_jax.finetune``) loads all-MiniLM-L6-v2 with a new classification
head, samples a random mask over the attention value and output projections
(the paper's placement; the head trains fully), trains with the memory-lean
step, evaluates on the validation split as it goes, and ends with the test
split. This script prints the test accuracy and MCC next to the majority-class
rate (a classifier that always answers the most frequent label has MCC 0).

Run:
  python examples/classify.py --dataset rotten-tomatoes --density 0.05 --steps 200 --output runs/classify
  python examples/classify.py --dataset tweets --density 0.01 --lr 1e-2 --steps 400 --output runs/tweets

It writes into --output what the job writes: config.json, metrics.jsonl,
curves.png, checkpoints/, adapter/ (merge it with examples/merge_adapter.py)
and results.json. An existing output directory is refused unless --overwrite
(start over) or --resume (continue from its last checkpoint) is given.
"""

from __future__ import annotations

import argparse
import json

from spra_jax.finetune import METHODS, FinetuneConfig, finetune


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="minilm", help="model alias or local checkpoint directory")
  ap.add_argument("--dataset", default="rotten-tomatoes", help="rotten-tomatoes, tweets, or a local CSV/JSON file")
  ap.add_argument("--method", default="spra", choices=METHODS, help="spra (SpaRTA) or a baseline")
  ap.add_argument("--density", type=float, default=0.05, help="fraction of the V/O projection entries that train")
  ap.add_argument("--distribution", default="uniform", help="mask distribution (spra.masks.available())")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--lr", type=float, default=2e-2)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--max-length", type=int, default=48, help="tokens per example (longer ones are truncated)")
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--eval-examples", type=int, default=512, help="validation examples per evaluation (0: all)")
  ap.add_argument("--test-examples", type=int, default=0, help="test examples of the final evaluation (0: all)")
  ap.add_argument("--seed", type=int, default=0, help="seeds the split, the mask, the head and the data order")
  ap.add_argument("--output", default="runs/classify")
  ap.add_argument("--overwrite", action="store_true", help="delete what --output holds and start over")
  ap.add_argument("--resume", action="store_true", help="continue the run saved in --output")
  ap.add_argument("--no-progress", action="store_true")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = FinetuneConfig(
      model=args.model, dataset=args.dataset, task="classification", method=args.method, density=args.density,
      distribution=args.distribution, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
      max_length=args.max_length, eval_every=args.eval_every, eval_examples=args.eval_examples,
      test_examples=args.test_examples, checkpoint_every=max(args.eval_every, 1), seed=args.seed, output=args.output)
  results = finetune(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)

  test, share = results["test"], results["trainable"] / results["parameters"]
  name = f"SpaRTA {100 * args.density:g} % ({args.distribution})" if args.method == "spra" else args.method
  rows = f"first {args.test_examples} rows of the " if args.test_examples else ""
  print(f"\n{args.dataset}, {results['steps']} steps, {rows}test split:")
  print("| model | test accuracy | test MCC | trainable parameters |")
  print("|---|---|---|---|")
  print(f"| majority class | {results['majority']:.4f} | 0.0000 | – |")
  print(f"| {name} | {test['accuracy']:.4f} | {test['mcc']:.4f} | "
        f"{results['trainable']:,} of {results['parameters']:,} ({100 * share:.3f} %) |")
  print(f"adapter: {results['adapter']}  ({results['seconds']:.0f} s)")
  print(json.dumps({"test_accuracy": test["accuracy"], "test_mcc": test["mcc"], "majority": results["majority"]}))
  return results


if __name__ == "__main__":
  main()
