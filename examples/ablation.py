"""Mask-distribution ablation: which entries should SpaRTA train, at the same number of trainable parameters?

For every distribution × density × seed of the grid, MiniLM (all-MiniLM-L6-v2
with a new classification head) is fine-tuned on a shipped dataset with the
memory-lean SpaRTA step, on the paper's placement (attention value and output
projections sparse, the head fully trained), and evaluated on the validation
and test splits. Every distribution gets the same budget, density × the
eligible entries; the structured ones round it to whole rows, columns or
tiles, and the score-based ones place it by data instead of chance:

  uniform         exactly k entries per leaf, uniformly (SpaRTA's default)
  bernoulli       each entry with probability d (the paper's code)
  rows, columns   whole rows / columns of each kernel
  blocks          random 16×16 tiles (--block)
  magnitude       the k entries of largest |w| in the pretrained weights
  magnitude-small the k entries of smallest |w|
  fisher          the k entries of largest diagonal Fisher (squared gradients
                  over --fisher-batches training batches, as the FISH mask)

The seed draws the mask, the new head and the order of the training data; the
train/validation/test split is fixed by --split-seed, so every run is scored on
the same examples.

Outputs (in --output):
  runs.jsonl   one JSON record per run, appended as each run ends. A rerun skips
               the runs already recorded there (same settings), so an
               interrupted sweep resumes, and a wider grid only adds its new runs.
  table.md     mean ± standard deviation over seeds per distribution and density.
  ablation.png test accuracy and MCC per distribution (error bars: std over seeds).

Run:
  python examples/ablation.py --distributions uniform,rows,magnitude --seeds 0,1,2 --densities 0.01 \\
      --steps 200 --output runs/ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spra_jax as spra

DISTRIBUTIONS = ("uniform", "bernoulli", "rows", "columns", "blocks", "magnitude", "magnitude-small", "fisher")
RECORD_KEYS = ("key", "config", "distribution", "density", "seed", "trainable", "sparse_trainable", "eligible",
               "validation", "test", "majority", "final_loss", "seconds")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides a run's numbers except the distribution, the density and the seed."""

  model: str = "minilm"
  dataset: str = "rotten-tomatoes"
  preset: str = "paper"
  split_seed: int = 0
  steps: int = 200
  lr: float = 2e-2
  weight_decay: float = 0.0
  warmup_ratio: float = 0.06
  batch_size: int = 32
  max_length: int = 48
  train_examples: int = 0
  eval_examples: int = 1000
  test_examples: int = 0
  block: tuple[int, int] = (16, 16)
  fisher_batches: int = 8


def run_config(settings: Settings, distribution: str, density: float, seed: int) -> dict[str, Any]:
  """The settings of one run, as stored in its record; equal configs are the same run."""
  config = dataclasses.asdict(settings)
  # Options of one distribution do not make the other distributions' runs new runs.
  block, fisher_batches = config.pop("block"), config.pop("fisher_batches")
  if distribution == "blocks":
    config["block"] = list(block)
  if distribution == "fisher":
    config["fisher_batches"] = fisher_batches
  return {**config, "distribution": distribution, "density": density, "seed": seed}


def run_key(config: dict[str, Any]) -> str:
  return json.dumps(config, sort_keys=True)


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a runs.jsonl file (a torn last line from an interrupted write is skipped)."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


# ---------------------------------------------------------------------------
# The task: data and model, loaded once per seed.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  arrays: dict[str, dict[str, np.ndarray]]
  num_labels: int


def load_task(settings: Settings, ds: Any, tokenizer: Any) -> Task:
  """The dataset's splits, tokenised (validation and test cut to their first examples when asked)."""
  limits = {"train": settings.train_examples, "validation": settings.eval_examples, "test": settings.test_examples}
  arrays = {}
  for name, limit in limits.items():
    split = ds[name].select(range(min(limit, len(ds[name])))) if limit else ds[name]
    arrays[name] = spra.data.tokenize_classification(split, tokenizer, max_length=settings.max_length)
  return Task(arrays, ds["train"].features["label"].num_classes)


def load_model(settings: Settings, labels: int, seed: int):
  """MiniLM with a new head initialised from ``seed``: ((graphdef, params, rest), tokenizer)."""
  model, tokenizer = spra.models.from_pretrained(settings.model, task="sequence-classification", num_labels=labels,
                                                 seed=seed)
  return nnx.split(model, nnx.Param, ...), tokenizer


def make_distribution(name: str, density: float, settings: Settings, params: Any, fisher: Any = None):
  if name in ("magnitude", "magnitude-small"):
    return spra.masks.magnitude(density, params, largest=name == "magnitude")
  if name == "fisher":
    return spra.masks.top_k(density, fisher)
  if name == "blocks":
    return spra.masks.blocks(density, block=settings.block)
  return spra.masks.get(name, density)


# ---------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------


class Runner:
  """The compiled pieces every run of a sweep shares: one lean trainer (step and forward pass).

  Masks with the same per-leaf counts (uniform and the score-based ones) reuse one compilation of the step.
  """

  def __init__(self, settings: Settings, graphdef: Any):
    self.settings = settings
    tx = spra.recipes.adamw(settings.lr, settings.steps, warmup_ratio=settings.warmup_ratio,
                            weight_decay=settings.weight_decay)
    self.trainer = spra.recipes.LeanTrainer(graphdef, tx, task="classification")


def fisher_of(runner: Runner, task: Task, params, rest, seed: int):
  settings = runner.settings
  stream = spra.data.batches(task.arrays["train"], settings.batch_size, seed=seed + 10_000)
  batches = [(rest, next(stream)[1]) for _ in range(settings.fisher_batches)]
  return spra.masks.fisher_scores(runner.trainer.loss_fn, params, batches)


def train_and_evaluate(runner: Runner, task: Task, params: Any, rest: Any, distribution: str, density: float,
                       seed: int) -> dict[str, Any]:
  """Samples the mask, trains ``settings.steps`` steps from ``params`` (left intact) and evaluates."""
  settings = runner.settings
  t0 = time.perf_counter()
  rules = spra.models.presets.get(settings.preset, "bert", task="sequence-classification")
  fisher = fisher_of(runner, task, params, rest, seed) if distribution == "fisher" else None
  dist = make_distribution(distribution, density, settings, params, fisher)
  mask = spra.sample_mask(jax.random.key(seed), params, dist, **rules)
  rows = spra.masks.summary_rows(mask)
  sparse = sum(r["trainable"] for r in rows if r["kind"] == "sparse")
  eligible = sum(r["size"] for r in rows if r["kind"] == "sparse")

  trainer = runner.trainer
  state = trainer.init(jax.tree.map(jnp.copy, params), mask)  # the step donates the weights; keep the base intact
  stream = spra.data.batches(task.arrays["train"], settings.batch_size, seed=seed)
  losses = []
  for _ in range(settings.steps):
    _, batch = next(stream)
    state, loss = trainer.step(state, rest, batch)
    losses.append(float(loss))
  if not all(map(math.isfinite, losses)):
    raise FloatingPointError(f"{distribution} d={density} seed={seed}: the loss became non-finite; lower --lr")
  state = trainer.finish(state)
  eval_batch = max(settings.batch_size, 64)
  validation, test = (spra.recipes.evaluate(lambda b: trainer.predict(state, rest, b), task.arrays[split],
                                            task="classification", batch_size=eval_batch)
                      for split in ("validation", "test"))
  labels = task.arrays["test"]["labels"]
  return {
      "distribution": distribution, "density": density, "seed": seed,
      "trainable": spra.num_trainable(mask), "sparse_trainable": sparse, "eligible": eligible,
      "validation": validation, "test": test, "majority": spra.recipes.majority_rate(labels),
      "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])), "seconds": time.perf_counter() - t0,
  }


# ---------------------------------------------------------------------------
# The sweep.
# ---------------------------------------------------------------------------


def grid(distributions: Sequence[str], densities: Sequence[float],
         seeds: Sequence[int]) -> list[tuple[str, float, int]]:
  """Seed outermost, so each seed's model is loaded once."""
  return [(dist, d, s) for s in seeds for d in densities for dist in distributions]


def sweep(settings: Settings, distributions: Sequence[str], densities: Sequence[float], seeds: Sequence[int],
          out: pathlib.Path, *, log=print) -> list[dict[str, Any]]:
  """Runs every grid point not yet in ``out/runs.jsonl`` and returns the grid's records."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / "runs.jsonl"
  done = {r["key"]: r for r in read_records(path)}
  todo = [(dist, d, s) for dist, d, s in grid(distributions, densities, seeds)
          if run_key(run_config(settings, dist, d, s)) not in done]
  total = len(grid(distributions, densities, seeds))
  log(f"{total} runs in the grid, {total - len(todo)} already in {path}, {len(todo)} to run")
  ds = task = runner = params = rest = model_seed = None
  for i, (dist, density, seed) in enumerate(todo, 1):
    if ds is None:
      ds = spra.data.load(settings.dataset, seed=settings.split_seed)
    if model_seed != seed:
      labels = ds["train"].features["label"].num_classes
      ((graphdef, params, rest), tokenizer), model_seed = load_model(settings, labels, seed), seed
      # Every seed's model has the same structure: the first graphdef (and its compilations) serves them all.
      runner = runner or Runner(settings, graphdef)
    if task is None:
      task = load_task(settings, ds, tokenizer)
    result = train_and_evaluate(runner, task, params, rest, dist, density, seed)
    config = run_config(settings, dist, density, seed)
    record = {"key": run_key(config), "config": config, **result}
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    done[record["key"]] = record
    log(f"[{i}/{len(todo)}] {dist:>15} d={density:g} seed={seed}: trainable {record['trainable']:,}, "
        f"val acc {record['validation']['accuracy']:.4f}, test acc {record['test']['accuracy']:.4f} "
        f"mcc {record['test']['mcc']:.4f} ({record['seconds']:.1f} s)")
  return [done[run_key(run_config(settings, dist, d, s))] for dist, d, s in grid(distributions, densities, seeds)]


# ---------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (distribution, density): means and standard deviations over seeds, in first-seen order."""
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["distribution"], r["density"]), []).append(r)
  rows = []
  for (dist, density), runs in groups.items():
    row = {"distribution": dist, "density": density, "seeds": len(runs),
           "trainable": statistics.fmean(r["trainable"] for r in runs),
           "sparse_trainable": statistics.fmean(r["sparse_trainable"] for r in runs),
           "seconds": statistics.fmean(r["seconds"] for r in runs)}
    for split in ("validation", "test"):
      for metric in ("accuracy", "mcc"):
        row[f"{split}_{metric}"] = _mean_std([r[split][metric] for r in runs])
    rows.append(row)
  return rows


def markdown_table(rows: Sequence[dict[str, Any]], majority: float | None = None) -> str:
  def cell(pair):
    mean, std = pair
    return f"{mean:.4f} ± {std:.4f}"

  lines = ["| distribution | density | trainable (sparse + head) | seeds | val accuracy | val MCC | test accuracy "
           "| test MCC | s / run |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['distribution']} | {r['density']:g} | {r['trainable']:,.0f} ({r['sparse_trainable']:,.0f} "
                 f"+ {r['trainable'] - r['sparse_trainable']:,.0f}) | {r['seeds']} | {cell(r['validation_accuracy'])} "
                 f"| {cell(r['validation_mcc'])} | {cell(r['test_accuracy'])} | {cell(r['test_mcc'])} "
                 f"| {r['seconds']:.1f} |")
  if majority is not None:
    lines.append(f"\nMajority class on the test examples: accuracy {majority:.4f}, MCC 0.")
  return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], png: pathlib.Path, *, title: str = "") -> None:
  """Test accuracy and MCC per distribution: each run as a dot, the mean ± std over seeds as a bar, per density."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = summarize(records)
  dists = list(dict.fromkeys(r["distribution"] for r in rows))
  densities = sorted({r["density"] for r in rows})
  offset = {d: (j - (len(densities) - 1) / 2) * 0.8 / len(densities) for j, d in enumerate(densities)}
  colors = {d: f"C{j}" for j, d in enumerate(densities)}
  fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(dists) * 2), 3.8))
  panels = ((axes[0], ("test", "accuracy"), "test accuracy"), (axes[1], ("test", "mcc"), "test MCC"))
  for ax, split_metric, label in panels:
    for r in records:
      x = dists.index(r["distribution"]) + offset[r["density"]]
      ax.plot(x, r[split_metric[0]][split_metric[1]], ".", color=colors[r["density"]], alpha=0.35)
    for d in densities:
      mine = [r for r in rows if r["density"] == d]
      xs = [dists.index(r["distribution"]) + offset[d] for r in mine]
      pairs = [r["_".join(split_metric)] for r in mine]
      ax.errorbar(xs, [p[0] for p in pairs], yerr=[p[1] for p in pairs], fmt="o", capsize=4, color=colors[d],
                  label=f"density {d:g}")
    if split_metric[1] == "accuracy" and records:
      ax.axhline(records[0]["majority"], color="gray", ls="--", lw=1, label="majority class")
    ax.set_xticks(range(len(dists)), dists, rotation=30, ha="right")
    ax.set(ylabel=label)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def _csv(kind):
  return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  d = Settings()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--distributions", type=_csv(str), default=["uniform", "bernoulli", "rows", "columns", "blocks",
                                                              "magnitude"],
                  help=f"comma-separated, from {', '.join(DISTRIBUTIONS)}")
  ap.add_argument("--densities", type=_csv(float), default=[0.01], help="comma-separated densities")
  ap.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="comma-separated seeds")
  ap.add_argument("--model", default=d.model)
  ap.add_argument("--dataset", default=d.dataset, help="rotten-tomatoes, tweets, or a local CSV/JSON file")
  ap.add_argument("--preset", default=d.preset, help="placement: paper, attention, mlp, all-linear")
  ap.add_argument("--split-seed", type=int, default=d.split_seed)
  ap.add_argument("--steps", type=int, default=d.steps)
  ap.add_argument("--lr", type=float, default=d.lr)
  ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
  ap.add_argument("--batch-size", type=int, default=d.batch_size)
  ap.add_argument("--max-length", type=int, default=d.max_length)
  ap.add_argument("--train-examples", type=int, default=d.train_examples, help="training examples used (0: all)")
  ap.add_argument("--eval-examples", type=int, default=d.eval_examples, help="validation examples (0: all)")
  ap.add_argument("--test-examples", type=int, default=d.test_examples, help="test examples (0: all)")
  ap.add_argument("--block", type=_csv(int), default=list(d.block), help="tile shape of 'blocks', e.g. 16,16")
  ap.add_argument("--fisher-batches", type=int, default=d.fisher_batches)
  ap.add_argument("--output", default="runs/ablation")
  args = ap.parse_args(argv)
  unknown = sorted(set(args.distributions) - set(DISTRIBUTIONS))
  if unknown:
    ap.error(f"unknown distributions {unknown}; choose from {', '.join(DISTRIBUTIONS)}")
  if len(args.block) != 2:
    ap.error("--block takes two numbers, e.g. 16,16")
  return args


def main(argv=None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  settings = Settings(model=args.model, dataset=args.dataset, preset=args.preset, split_seed=args.split_seed,
                      steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                      max_length=args.max_length, train_examples=args.train_examples, eval_examples=args.eval_examples,
                      test_examples=args.test_examples, block=tuple(args.block), fisher_batches=args.fisher_batches)
  out = pathlib.Path(args.output)
  records = sweep(settings, args.distributions, args.densities, args.seeds, out)
  rows = summarize(records)
  majority = records[0]["majority"] if records else None
  table = markdown_table(rows, majority)
  (out / "table.md").write_text(table + "\n")
  plot(records, out / "ablation.png",
       title=f"{settings.model} on {settings.dataset}, {settings.steps} steps, mean ± std over seeds")
  print(table)
  print(f"wrote {out / 'runs.jsonl'}, {out / 'table.md'}, {out / 'ablation.png'}")
  return records


if __name__ == "__main__":
  main()
