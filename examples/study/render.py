"""Rendering: the tables, the computed comparisons and the plots of RESULTS.md, from the run records."""

from __future__ import annotations

import math
import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from .plan import DECODER_NAMES, LR_FACTORS, SEEDS, Row, Scale
from .runs import row_records
from .store import Store


def _ms(values: Sequence[float]) -> tuple[float, float]:
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[Row], store: Store, scales: dict[str, Scale]):
  out = []
  for row in rows:
    grid, chosen, runs = row_records(row, store, scales)
    entry = {"row": row, "grid": grid, "lr": chosen, "runs": runs}
    if runs:
      entry.update(
          acc=_ms(r["test"]["accuracy"] for r in runs), mcc=_ms(r["test"]["mcc"] for r in runs),
          trainable=runs[0]["trainable"], parameters=runs[0]["parameters"],
          opt_state_bytes=runs[0]["opt_state_bytes"], step_ms=statistics.median(r["step_ms"] for r in runs),
          edge=len(row.lrs()) > 1 and chosen in (row.lrs()[0], row.lrs()[-1]))
    out.append(entry)
  return out


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def _pm(pair) -> str:
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def table_markdown(entries: Sequence[dict[str, Any]]) -> str:
  lines = ["| method | trainable | % of model | optimizer state | step (ms) | lr | seeds | test accuracy | test MCC |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for e in entries:
    row = e["row"]
    if not e["runs"]:
      lines.append(f"| {row.label} | (not run yet) | | | | | 0 | | |")
      continue
    lr = f"{e['lr']:.3g}" + (" (edge)" if e["edge"] else "")
    lines.append(f"| {row.label} | {e['trainable']:,} | {100 * e['trainable'] / e['parameters']:.3f} % "
                 f"| {_bytes(e['opt_state_bytes'])} | {e['step_ms']:.0f} | {lr} | {len(e['runs'])} "
                 f"| {_pm(e['acc'])} | {_pm(e['mcc'])} |")
  return "\n".join(lines)


def lr_markdown(entries: Sequence[dict[str, Any]]) -> str:
  lines = ["| table | method | validation accuracy at each learning rate (seed 0; **chosen**) |", "|---|---|---|"]
  for e in entries:
    cells = []
    for lr, r in e["grid"].items():
      if r is None:
        cells.append(f"{lr:.3g}: -")
        continue
      v = "diverged" if r.get("diverged") else f"{r['validation']['accuracy']:.3f}"
      cells.append(f"**{lr:.3g}: {v}**" if lr == e["lr"] else f"{lr:.3g}: {v}")
    lines.append(f"| {e['row'].table} | {e['row'].label} | {', '.join(cells)} |")
  return "\n".join(lines)


def findings(entries: Sequence[dict[str, Any]]) -> list[str]:
  """Comparisons computed from the numbers: SpaRTA vs LoRA at equal counts, and the ablation against uniform."""
  done = [e for e in entries if e["runs"]]
  out = []

  def diff(a, b, what):
    d = a[what][0] - b[what][0]
    noise = math.hypot(a[what][1], b[what][1])
    verdict = "within the seed spread" if abs(d) <= noise else ("better" if d > 0 else "worse")
    return d, noise, verdict

  for e in done:
    row = e["row"]
    if row.method != "spra" or not row.budget.startswith("lora-rank="):
      continue
    rank = int(row.budget.partition("=")[2])
    lora = next((v for v in done if v["row"].table == row.table and v["row"].method == "lora"
                 and v["row"].rank == rank), None)
    if lora is None:
      continue
    da, na, va = diff(e, lora, "acc")
    dm, nm, vm = diff(e, lora, "mcc")
    out.append(f"{row.table}: SpaRTA at LoRA rank {rank}'s count ({e['trainable']:,} vs {lora['trainable']:,} "
               f"trainable) minus LoRA: accuracy {da:+.3f} ({va}, spread {na:.3f}), MCC {dm:+.3f} ({vm}, spread "
               f"{nm:.3f}); optimizer state {e['opt_state_bytes'] / lora['opt_state_bytes']:.2f}x LoRA's, step time "
               f"{e['step_ms'] / lora['step_ms']:.2f}x.")
  t3 = [e for e in done if e["row"].table == "Table 3"]
  uniform = next((e for e in t3 if e["row"].distribution == "uniform" and e["row"].preset == "paper"), None)
  if uniform:
    ranked = sorted(t3, key=lambda e: -e["acc"][0])
    out.append("Table 3, test accuracy from best to worst: " + ", ".join(
        f"{e['row'].label} {e['acc'][0]:.3f}" for e in ranked) + ".")
    for e in t3:
      if e is uniform:
        continue
      da, na, va = diff(e, uniform, "acc")
      if va != "within the seed spread":
        out.append(f"Table 3: {e['row'].label} is {va} than uniform on V/O by {abs(da):.3f} accuracy "
                   f"(spread {na:.3f}).")
  return out


def plot_tradeoff(entries: Sequence[dict[str, Any]], png: pathlib.Path) -> None:
  """Test accuracy against trainable parameters (log scale), one panel per Table 1 / Table 2 dataset."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tables = [t for t in dict.fromkeys(e["row"].table for e in entries) if t != "Table 3"]
  tables = [t for t in tables if any(e["runs"] for e in entries if e["row"].table == t)]
  if not tables:
    return
  fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.0), squeeze=False)
  style = {"spra": ("o-", "C0", "SpaRTA"), "lora": ("s", "C1", "LoRA"), "full": ("*", "C3", "full"),
           "head": ("v", "C2", "head only")}
  for ax, table in zip(axes[0], tables):
    mine = [e for e in entries if e["row"].table == table and e["runs"]]
    for method, (fmt, color, name) in style.items():
      pts = sorted((e for e in mine if e["row"].method == method), key=lambda e: e["trainable"])
      if not pts:
        continue
      ax.errorbar([e["trainable"] for e in pts], [e["acc"][0] for e in pts], yerr=[e["acc"][1] for e in pts],
                  fmt=fmt, color=color, capsize=3, label=name, ms=7)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel="test accuracy (mean ± std over seeds)", title=table)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def plot_ablation(entries: Sequence[dict[str, Any]], png: pathlib.Path) -> None:
  """Table 3 as bars: test accuracy and MCC per distribution / placement, error bars over seeds, runs as dots."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mine = [e for e in entries if e["row"].table == "Table 3" and e["runs"]]
  if not mine:
    return
  fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * len(mine) * 2), 4.2))
  for ax, (key, metric, name) in zip(axes, (("acc", "accuracy", "test accuracy"), ("mcc", "mcc", "test MCC"))):
    xs = range(len(mine))
    ax.bar(xs, [e[key][0] for e in mine], yerr=[e[key][1] for e in mine], capsize=3,
           color=["C0" if e["row"].preset == "paper" else "C4" for e in mine], alpha=0.8)
    for x, e in zip(xs, mine):
      ax.plot([x] * len(e["runs"]), [r["test"][metric] for r in e["runs"]], "k.", alpha=0.5)
    low = min(r["test"][metric] for e in mine for r in e["runs"])
    ax.set_ylim(max(0.0, low - 0.05), None)
    ax.set_xticks(list(xs), [e["row"].label for e in mine], rotation=35, ha="right", fontsize=8)
    ax.set(ylabel=name)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Table 3: which entries and where, at one budget (MiniLM, Rotten Tomatoes)")
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def render(rows: Sequence[Row], store: Store, scales: dict[str, Scale], results: pathlib.Path,
           output: pathlib.Path, *, discussion: pathlib.Path | None = None, decoder: str = "smollm2-135m") -> str:
  """Writes RESULTS.md and the plots from the saved runs; returns the markdown."""
  entries = summarize(rows, store, scales)
  tradeoff, ablation = output / "tradeoff.png", output / "ablation.png"
  plot_tradeoff(entries, tradeoff)
  plot_ablation(entries, ablation)
  rel = lambda p: os.path.relpath(p, results.parent)  # noqa: E731
  runs = sorted(store.dir.glob("*.json"))
  threaded = any(r.get("single_threaded") for e in entries for r in e["runs"])
  enc, dec = scales["encoder"], scales["decoder"]
  parts = [
      "# Results: SpaRTA against LoRA, full fine-tuning and other masks",
      "",
      "Generated by `python examples/study` from the run records in "
      f"`{rel(store.dir)}/` ({len(runs)} runs); `--render-only` rebuilds this page from them. "
      "Everything ran on CPU, offline, on the pretrained models and labelled data that pip packages ship.",
      "",
      "**Protocol.** Each row's learning rate is chosen on validation accuracy (seed 0) from the same three-point "
      f"grid around the method's customary value (x{', x'.join(f'{f:.3g}' for f in LR_FACTORS)}); the chosen rate "
      f"runs with seeds {', '.join(map(str, SEEDS))} (Table 2: two seeds, one for full fine-tuning and for the "
      "second decoder) and the test "
      "metrics are mean ± std over them. "
      "'(edge)' marks a rate at the end of its grid (the optimum may lie beyond). "
      f"Encoder runs: {enc.steps} steps of {enc.batch_size} examples, {enc.max_length} tokens, AdamW with "
      f"{enc.warmup_ratio:.0%} warm-up and cosine decay, weight decay {enc.weight_decay}, validation on "
      f"{enc.eval_examples} examples, test on {enc.test_examples}. Decoder runs: {dec.steps} steps of "
      f"{dec.batch_size}, {dec.max_length} tokens, validation {dec.eval_examples}, test {dec.test_examples}. "
      f"These are short, low-data runs ({enc.steps * enc.batch_size:,} and {dec.steps * dec.batch_size:,} training "
      "examples): they compare methods under one "
      "budget, they are not the best each model can reach.",
      "",
      "**Columns.** *trainable*: scalars that receive updates (the new head included for every method but full "
      "fine-tuning, which trains everything); *optimizer state*: AdamW's moments over the trained scalars, plus "
      "SpaRTA's int32 indices; *step*: median wall time of a training step (the first, compiling step excluded), "
      f"measured in the study's own processes on a {os.cpu_count()}-core CPU"
      f"{' (single-threaded workers side by side)' if threaded else ''}, so compare ratios within a table, not "
      "absolute times across machines.",
      "",
  ]
  name = DECODER_NAMES.get(decoder, pathlib.Path(decoder).name)
  second = {e["row"].table for e in entries if e["row"].table.startswith("Table 2: ")}
  titles = {"Table 2": f"Table 2: {name} with a classification head, Rotten Tomatoes (the paper's setting)",
            **{t: f"{t} with a classification head, Rotten Tomatoes (one seed"
                  + ("; the paper's family, its Q4_K_M weights dequantised to float32)" if "Gemma" in t else ")")
               for t in second},
            "Table 3": "Table 3: which entries and where, at one budget (MiniLM, Rotten Tomatoes, "
                       "the count of 1 % of V/O)"}
  for table in dict.fromkeys(e["row"].table for e in entries):
    mine = [e for e in entries if e["row"].table == table]
    title = titles.get(table, table.replace("Table 1: ", "Table 1: all-MiniLM-L6-v2, ") + " (encoder)")
    parts += [f"## {title}", "", table_markdown(mine), ""]
    majority = next((r for e in mine for r in e["runs"]), None)
    if majority is not None and "majority" in majority:
      parts += [f"Majority class on the test examples: accuracy {majority['majority']:.3f}, MCC 0.", ""]
  if tradeoff.exists():
    parts += ["## Accuracy against trainable parameters", "", f"![trade-off]({rel(tradeoff)})", ""]
  if ablation.exists():
    parts += ["## The ablation at a glance", "", f"![ablation]({rel(ablation)})", ""]
  found = findings(entries)
  if found:
    parts += ["## Computed comparisons", "",
              "Differences of means; 'within the seed spread' when the difference is no larger than the two "
              "standard deviations combined (sqrt(s1² + s2²)), which with three seeds is the honest reading.", ""]
    parts += [f"- {line}" for line in found] + [""]
  if discussion is not None and discussion.exists():
    parts += [discussion.read_text().strip(), ""]
  parts += ["## Learning-rate tuning", "", lr_markdown(entries), ""]
  text = "\n".join(parts)
  results.parent.mkdir(parents=True, exist_ok=True)
  results.write_text(text)
  return text
