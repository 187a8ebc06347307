"""Merge a SpaRTA adapter into its base model, check the merged model, and export it in Hugging Face layout.

A SpaRTA adapter is indices plus values: merged into the base weights it costs
nothing at inference. This script

1. takes an adapter directory written by the fine-tuning job (``--adapter
   runs/classify/adapter``, from examples/classify.py or ``spra-jax finetune``),
   or, without ``--adapter``, fine-tunes MiniLM for ``--steps`` steps itself and
   keeps the trained model in memory as the reference;
2. rebuilds the base model the job started from (the adapter's
   ``adapter_config.json`` holds the job's config: model, seed, dataset...),
   loads the adapter against it and merges: ``spra.merge(base, delta)``;
3. checks the merged model:
   * weights: merged == base + the adapter's values at its indices, recomputed
     here in float64 (max abs difference), and ``spra.unmerge`` gives the base back;
   * outputs: the merged model's logits against the trained model's (a fresh
     run), or its validation metrics against the ones the job recorded in
     ``results.json`` (same examples, same predictions); the base model's
     logits differ (the adapter matters);
4. with ``--export DIR``, writes the merged model as ``config.json`` +
   ``model.safetensors`` + tokenizer files in Hugging Face names and layout
   (``spra.checkpoint.export_merged``), loads it back with
   ``spra.models.from_pretrained`` and compares the logits (and, with
   ``--torch``, loads it into PyTorch ``transformers`` too).

Run:
  python examples/merge_adapter.py --adapter runs/classify/adapter --export runs/classify/merged
  python examples/merge_adapter.py --steps 30 --output runs/merge --export runs/merge/merged
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spra_jax as spra
from spra_jax.finetune import FinetuneConfig, Job


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--adapter", default=None, help="adapter directory of a finished job (default: train one here)")
  ap.add_argument("--output", default="runs/merge", help="where a fresh run writes its adapter")
  ap.add_argument("--export", default=None, help="write the merged model here in Hugging Face layout")
  ap.add_argument("--torch", action="store_true", help="also load the export with PyTorch transformers")
  ap.add_argument("--compare-examples", type=int, default=64, help="validation examples whose logits are compared")
  fresh = ap.add_argument_group("a fresh run (without --adapter)")
  fresh.add_argument("--model", default="minilm")
  fresh.add_argument("--dataset", default="rotten-tomatoes")
  fresh.add_argument("--density", type=float, default=0.05)
  fresh.add_argument("--steps", type=int, default=30)
  fresh.add_argument("--lr", type=float, default=2e-2)
  fresh.add_argument("--batch-size", type=int, default=32)
  fresh.add_argument("--max-length", type=int, default=48)
  fresh.add_argument("--seed", type=int, default=0)
  return ap.parse_args(argv)


def compare_batch(job: Job, examples: int) -> dict[str, jax.Array]:
  """The first validation examples, whose logits the checks compare."""
  n = min(examples, len(job.arrays["validation"]["labels"]))
  return {k: jnp.asarray(v[:n]) for k, v in job.arrays["validation"].items()}


def train_fresh(args) -> tuple[pathlib.Path, np.ndarray, Job]:
  """A short SpaRTA run with the job's pieces: returns (adapter dir, the trained model's logits, the job)."""
  config = FinetuneConfig(model=args.model, dataset=args.dataset, task="classification", density=args.density,
                          lr=args.lr, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          seed=args.seed, output=args.output)
  job = Job(config)
  run = job.build()
  state = run.init()
  stream = spra.data.batches(job.arrays["train"], config.batch_size, seed=config.seed)
  for _ in range(config.steps):
    state, loss = run.step(state, next(stream)[1])
  print(f"trained {config.steps} steps (last loss {float(loss):.4f})")
  state, predict = run.predictor(state)  # the weights the step updated in place: base + delta
  trained_logits = np.asarray(predict(compare_batch(job, args.compare_examples)))
  adapter = pathlib.Path(args.output) / "adapter"
  run.save_adapter(adapter, state, metadata={"config": config.identity(), "base_model": config.model})
  return adapter, trained_logits, job


def base_model(config: FinetuneConfig, num_labels: int):
  """The model the job started from: the pretrained body and the head initialised from the run's seed."""
  model, tokenizer = spra.models.from_pretrained(config.model, task="sequence-classification", num_labels=num_labels,
                                                 seed=config.seed)
  return model, tokenizer


def hf_config(model_name: str, label_names: list[str]) -> dict[str, Any]:
  """The base checkpoint's config.json, turned into a sequence classifier's."""
  source = spra.models.hub.resolve(model_name)
  config = json.loads(((source if source.is_dir() else source.parent) / "config.json").read_text())
  return {**config, "architectures": ["BertForSequenceClassification"],
          "id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_max_abs(a, b) -> float:
  return max(max_abs(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def reference_merge(params, delta) -> Any:
  """base + delta summed in float64 numpy and rounded once to the weights' dtype, independently of spra.merge."""
  def one(m, w, v):
    dtype, w = w.dtype, np.asarray(w, np.float64).copy()
    if m.kind == spra.masks.FULL:
      w += np.asarray(v, np.float64).reshape(w.shape)
    elif m.kind == spra.masks.SPARSE:
      w.reshape(-1)[np.asarray(m.indices)] += np.asarray(v, np.float64)
    return w.astype(dtype)
  return jax.tree.map(one, delta.mask, params, delta.values, is_leaf=spra.masks.is_leaf_mask)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  t0 = time.perf_counter()
  trained_logits = job = None
  adapter = pathlib.Path(args.adapter) if args.adapter else None
  if adapter is None:
    adapter, trained_logits, job = train_fresh(args)
  saved = spra.load_adapter_config(adapter)
  config = FinetuneConfig(**{**saved["metadata"]["config"], "output": str(adapter.parent)})
  if config.method not in ("spra", "head"):
    raise SystemExit(f"{adapter} holds a {config.method!r} run; only SpaRTA (and head-only) runs save sparse deltas")
  if job is None:
    job = Job(config)  # the dataset split and tokenisation of the run
  if trained_logits is None:
    model, tokenizer = job.model, job.tokenizer  # the job loads the base exactly as the run did
  else:
    model, tokenizer = base_model(config, job.num_labels)  # the trained run updated its weights in place
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  delta = spra.load_adapter(adapter, like=params)
  merged = spra.merge(params, delta)
  print(f"adapter {adapter}: {spra.num_trainable(delta.mask):,} trained entries "
        f"({delta.nbytes / 2**10:.0f} KiB) over {sum(x.size for x in jax.tree.leaves(params)):,} parameters")

  report: dict[str, Any] = {"adapter": str(adapter), "trainable": spra.num_trainable(delta.mask)}
  report["weights_vs_float64_reference"] = tree_max_abs(merged, reference_merge(params, delta))
  report["unmerge_vs_base"] = tree_max_abs(spra.unmerge(merged, delta), params)

  model_forward = spra.recipes.model_forward(graphdef)
  forward = jax.jit(lambda p, batch: model_forward(p, rest, batch))
  batch = compare_batch(job, args.compare_examples)
  merged_logits = np.asarray(forward(merged, batch))
  report["merged_vs_base_logits"] = max_abs(merged_logits, forward(params, batch))
  if trained_logits is not None:
    report["merged_vs_trained_logits"] = max_abs(merged_logits, trained_logits)
  results_file = adapter.parent / "results.json"
  if results_file.exists():
    recorded = json.loads(results_file.read_text())["validation"]
    again = spra.recipes.evaluate(lambda b: forward(merged, b), job.arrays["validation"], task="classification",
                                  batch_size=config.batch_size, limit=config.eval_examples)
    report["validation_recorded"], report["validation_merged"] = recorded, again
    report["validation_reproduced"] = again == recorded

  if args.export:
    export = pathlib.Path(args.export)
    bert = spra.models.bert
    spra.checkpoint.export_merged(export, merged, config=hf_config(config.model, job.label_names),
                                  torch_name=bert.torch_name, to_torch_layout=bert.to_torch_layout, overwrite=True)
    tokenizer.save_pretrained(export)
    reloaded, _ = spra.models.from_pretrained(export, task="sequence-classification")
    report["export"] = str(export)
    report["export_files"] = sorted(p.name for p in export.iterdir())
    report["export_reloaded_vs_merged_logits"] = max_abs(merged_logits, reloaded(batch["input_ids"],
                                                                                 batch["attention_mask"]))
    if args.torch:
      import torch
      import transformers

      hf = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
      with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(np.asarray(batch["input_ids"], np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))).logits.numpy()
      report["export_torch_vs_merged_logits"] = max_abs(merged_logits, theirs)
  report["seconds"] = time.perf_counter() - t0

  print("| check | max abs difference |")
  print("|---|---|")
  for key in ("weights_vs_float64_reference", "unmerge_vs_base", "merged_vs_trained_logits",
              "export_reloaded_vs_merged_logits", "export_torch_vs_merged_logits", "merged_vs_base_logits"):
    if key in report:
      print(f"| {key.replace('_', ' ')} | {report[key]:.3g} |")
  if "validation_reproduced" in report:
    print(f"validation metrics of the merged model {report['validation_merged']} "
          f"{'==' if report['validation_reproduced'] else '!='} the job's {report['validation_recorded']}")
  if args.export:
    print(f"merged model in Hugging Face layout: {report['export']} ({', '.join(report['export_files'])})")
  return report


if __name__ == "__main__":
  main()
