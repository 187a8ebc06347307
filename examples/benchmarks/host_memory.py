"""Benchmark: the host memory (peak RSS) of a fine-tuning run, the job beside a PyTorch peer.

Each run is its own subprocess, and its peak resident set size is what the
kernel reports for that child (``os.wait4``'s ``ru_maxrss``), so runs do not
see each other's memory. Runs, on the demo's configuration (``make demo``:
MiniLM-L6 on Rotten Tomatoes, batch 32, 48 tokens, SpaRTA at density 0.05),
shortened to ``--steps`` steps and an evaluation on ``--eval-examples``
validation examples:

  job <method>   ``python -m spra_jax finetune --method <method> ...`` for each
                 of ``--methods`` (default: spra, lora, full), CPU, float32.
  torch peer     the same model, data and batch shape in PyTorch with the
                 paper's package (``peft_sparta.SpaRTA``, 5 % of the
                 attention-value, attention-output and output kernels, AdamW),
                 tokenised with the same tokenizer; only if torch and
                 peft-sparta are installed.

Each row also says whether the run imported torch. The goal: the job's peak
RSS for SpaRTA at most the PyTorch peer's.

Run:
  python examples/benchmarks/host_memory.py [--steps 20] [--methods spra,lora,full]
          [--json examples/benchmarks/results/host_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH, MAX_LENGTH, DENSITY, LR = 32, 48, 0.05, 2e-2

# The job, run through its command-line entry point, then a line saying whether torch was imported.
JOB = """
import sys
from spra_jax import cli
status = cli.main(sys.argv[1:])
print("TORCH_IMPORTED", "torch" in sys.modules, flush=True)
sys.exit(status)
"""

# The PyTorch peer: the paper's package on the same model, data and batch shape.
PEER = """
import json, sys, time
import torch
from peft_sparta import SpaRTA
from transformers import AutoTokenizer, BertForSequenceClassification

model_dir, data_file, steps, batch, max_length, density, lr, eval_examples = sys.argv[1:9]
steps, batch, max_length, eval_examples = int(steps), int(batch), int(max_length), int(eval_examples)
torch.manual_seed(0)
torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
splits = json.load(open(data_file))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
encode = lambda texts: tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt")
train = encode(splits["train"]["text"])  # the whole split, as the job does
labels = torch.tensor(splits["train"]["label"])
model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
frozen = ["embeddings", "attention.self.query", "attention.self.key", "intermediate", "LayerNorm", "pooler"]
sparta = SpaRTA(model, sparsity=1 - float(density), frozen_modules=frozen)
optimizer = torch.optim.AdamW(sparta.parameters(), lr=float(lr))
t0 = time.perf_counter()
for step in range(steps):
  rows = slice(step * batch, (step + 1) * batch)
  out = sparta(input_ids=train["input_ids"][rows], attention_mask=train["attention_mask"][rows],
               labels=labels[rows])
  out.loss.backward()
  optimizer.step()
  optimizer.zero_grad()
sparta.eval()
valid = encode(splits["validation"]["text"][:eval_examples])
correct = 0
with torch.no_grad():
  for i in range(0, eval_examples, batch):
    logits = sparta(input_ids=valid["input_ids"][i:i + batch], attention_mask=valid["attention_mask"][i:i + batch]).logits
    correct += int((logits.argmax(-1) == torch.tensor(splits["validation"]["label"][i:i + batch])).sum())
print("TRAIN_S", time.perf_counter() - t0, "ACCURACY", correct / eval_examples, flush=True)
print("TORCH_IMPORTED", "torch" in sys.modules, flush=True)
"""


def run(cmd: list[str], env: dict) -> dict:
  """Runs ``cmd`` as a child process; its own peak RSS (MiB), wall time, exit status and output tail."""
  t0 = time.perf_counter()
  with tempfile.TemporaryFile() as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace")
  # ru_maxrss is in KiB on Linux.
  return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1),
          "returncode": proc.returncode, "torch_imported": "TORCH_IMPORTED True" in text,
          "tail": text[-1500:]}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--eval-examples", type=int, default=512)
  ap.add_argument("--methods", default="spra,lora,full", help="the job's methods, comma-separated")
  ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
  ap.add_argument("--json", default=os.path.join(RESULTS, "host_memory.json"))
  args = ap.parse_args(argv)

  import spra_jax as spra  # only the parent: the children import what they need themselves

  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
      cmd = [sys.executable, "-c", JOB, "finetune", "--model", "minilm", "--dataset", "rotten-tomatoes",
             "--method", method, "--density", str(DENSITY), "--steps", str(args.steps), "--batch-size", str(BATCH),
             "--max-length", str(MAX_LENGTH), "--eval-every", str(args.steps), "--eval-examples",
             str(args.eval_examples), "--test-examples", str(args.eval_examples), "--output",
             os.path.join(tmp, method), "--overwrite"]
      rows[f"job {method}"] = run(cmd, env)
      print(f"job {method}: {rows[f'job {method}']['peak_rss_mib']:,} MiB", flush=True)
    peer_ready = not args.no_peer and all(
        __import__("importlib.util").util.find_spec(m) is not None for m in ("torch", "peft_sparta"))
    if peer_ready:
      ds = spra.data.load("rotten-tomatoes", seed=0)
      data_file = os.path.join(tmp, "splits.json")
      with open(data_file, "w") as f:
        json.dump({s: {"text": list(ds[s]["text"]), "label": [int(x) for x in ds[s]["label"]]}
                   for s in ("train", "validation")}, f)
      model_dir = str(spra.models.hub.resolve("minilm"))
      cmd = [sys.executable, "-c", PEER, model_dir, data_file, str(args.steps), str(BATCH), str(MAX_LENGTH),
             str(DENSITY), str(LR), str(args.eval_examples)]
      rows["torch peer (peft-sparta)"] = run(cmd, env)
      print(f"torch peer: {rows['torch peer (peft-sparta)']['peak_rss_mib']:,} MiB", flush=True)

  failed = {name: r["tail"] for name, r in rows.items() if r["returncode"] != 0}
  if failed:
    for name, tail in failed.items():
      print(f"--- {name} failed:\n{tail}", file=sys.stderr)
  lines = ["| run | peak RSS | wall | imports torch |", "|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['peak_rss_mib']:,.0f} MiB | {r['wall_s']:.0f} s | {'yes' if r['torch_imported'] else 'no'} |")
  goals = []
  peer = rows.get("torch peer (peft-sparta)")
  if peer is not None and "job spra" in rows:
    job = rows["job spra"]
    goals.append({"goal": "job (spra) peak RSS <= torch peer's", "value": job["peak_rss_mib"],
                  "bound": peer["peak_rss_mib"], "met": job["peak_rss_mib"] <= peer["peak_rss_mib"]})
  table = "\n".join(lines)
  print(table)
  for g in goals:
    print(f"- goal: {g['goal']}: {g['value']:,} vs {g['bound']:,} MiB -> {'met' if g['met'] else 'MISSED'}")
  summary = {"benchmark": "host_memory", "steps": args.steps, "eval_examples": args.eval_examples,
             "cpu_count": os.cpu_count(), "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tail"}
                                                   for k, v in rows.items()},
             "goals": goals, "failed": sorted(failed)}
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
      f.write(table + "\n" + "\n".join(f"- goal: {g['goal']}: {g['value']:,} vs {g['bound']:,} MiB -> "
                                       f"{'met' if g['met'] else 'MISSED'}" for g in goals) + "\n")
    print(f"wrote {args.json}")
  return summary


if __name__ == "__main__":
  s = main()
  sys.exit(1 if s["failed"] or not all(g["met"] for g in s["goals"]) else 0)
