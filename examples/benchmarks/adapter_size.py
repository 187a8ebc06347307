"""Benchmark: bytes on disk of a SpaRTA adapter for a 7B Llama, per storage method.

The mask is sampled over the shapes of Llama-2-7B (``jax.ShapeDtypeStruct``, no
weights) on every linear kernel of the decoder layers; the delta values are
random float32 (incompressible, as trained deltas are). Each method's bytes on
disk are set beside the issue's bound, ``1.1 × k × (value bytes + 4)``, plus the
adapter's JSON metadata.

Methods:

* ``spra int32``: :func:`spra.save_adapter` with int32 indices (Orbax arrays;
  Orbax compresses its chunks, which already shrinks sorted indices);
* ``spra gaps``: :func:`spra.save_adapter` with ``index_encoding="gaps"``
  (sorted gaps in 1 or 2 bytes per index, uint32 escapes);
* ``peft-sparta``: the SpaRTA PyTorch package's ``sparse_deltas.safetensors``
  (int32 ``[k, 2]`` coordinates plus float32 deltas, uncompressed).

Run:
  python examples/benchmarks/adapter_size.py [--densities 0.01 0.001] [--layers 32]
          [--small] [--json examples/benchmarks/results/adapter_size.json]
          [--md examples/benchmarks/results/adapter_size.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import spra_jax as spra

INCLUDE = r"layers/.*/kernel"


def llama_shapes(layers: int = 32, d: int = 4096, ffn: int = 11008, vocab: int = 32000, dtype=jnp.bfloat16):
  """Parameter shapes of Llama-2-7B (HF names, kernels stored [in, out])."""
  sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  layer = {
      "self_attn": {n: {"kernel": sds(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {
          "gate_proj": {"kernel": sds(d, ffn)},
          "up_proj": {"kernel": sds(d, ffn)},
          "down_proj": {"kernel": sds(ffn, d)},
      },
      "input_layernorm": {"scale": sds(d)},
      "post_attention_layernorm": {"scale": sds(d)},
  }
  return {
      "model": {
          "embed_tokens": {"embedding": sds(vocab, d)},
          "layers": {str(i): layer for i in range(layers)},
          "norm": {"scale": sds(d)},
      },
      "lm_head": {"kernel": sds(d, vocab)},
  }


def disk_bytes(path: str, *, exclude: tuple[str, ...] = ()) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f not in exclude)


def random_delta(mask, seed: int) -> spra.SparseDelta:
  rng = np.random.default_rng(seed)

  def values(m):
    if m.kind == "frozen":
      return None
    return rng.standard_normal(m.num_trainable if m.kind == "sparse" else m.shape, dtype=np.float32)

  return spra.SparseDelta(mask, jax.tree.map(values, mask, is_leaf=spra.masks.is_leaf_mask))


def measure(shapes, density: float, workdir: str, seed: int = 0) -> dict:
  t0 = time.perf_counter()
  mask = spra.sample_mask(jax.random.key(seed), shapes, density=density, include=INCLUDE)
  mask = jax.tree.map(lambda m: m if m.kind != "sparse" else spra.LeafMask.sparse(m.shape, np.asarray(m.indices)),
                      mask, is_leaf=spra.masks.is_leaf_mask)
  sample_s = time.perf_counter() - t0
  delta = random_delta(mask, seed + 1)
  k = spra.num_trainable(mask)
  value_bytes = 4
  bound = 1.1 * k * (value_bytes + 4)
  rows = {}
  for method in ("spra int32", "spra gaps", "peft-sparta"):
    out = os.path.join(workdir, method.replace(" ", "_"))
    t = time.perf_counter()
    if method.startswith("spra"):
      spra.save_adapter(out, delta, index_encoding=method.split()[1], metadata={"density": density, "seed": seed,
                                                                               "include": INCLUDE})
      save_s = time.perf_counter() - t
      metadata = disk_bytes(os.path.join(out, "adapter_config.json"))
      data = disk_bytes(out, exclude=("adapter_config.json",))
      t = time.perf_counter()
      loaded = spra.load_adapter(out)
      load_s = time.perf_counter() - t
      assert spra.num_trainable(loaded.mask) == k
    else:
      spra.checkpoint.export_peft_sparta(out, delta, base_model="meta-llama/Llama-2-7b-hf")
      save_s = time.perf_counter() - t
      metadata = disk_bytes(os.path.join(out, "config.json"))
      data = disk_bytes(os.path.join(out, spra.checkpoint.interop.SPARSE_DELTAS_FILE))
      load_s = None
    rows[method] = {
        "data_bytes": data,
        "metadata_bytes": metadata,
        "bytes_per_entry": data / k,
        "vs_bound": data / bound,
        "within_bound": data <= bound,
        "save_s": save_s,
        "load_s": load_s,
    }
    shutil.rmtree(out)
  return {"density": density, "trainable": k, "bound_bytes": bound, "raw_bytes": k * (value_bytes + 4),
          "sample_s": sample_s, "rows": rows}


def markdown(results: list[dict], layers: int) -> str:
  lines = [
      (
          f"Adapter bytes on disk, Llama-2-7B shapes ({layers} layers), every linear kernel of the layers at the "
          "density, float32 values. Bound = 1.1 × k × (4 + 4) bytes; metadata (JSON) is counted apart."
      ),
      "",
      "| density | k | method | data bytes | bytes / entry | × bound | within | JSON metadata | save s | load s |",
      "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
  ]
  for res in results:
    for method, r in res["rows"].items():
      load = f"{r['load_s']:.2f}" if r["load_s"] is not None else "–"
      lines.append(
          f"| {100 * res['density']:g} % | {res['trainable']:,} | {method} | {r['data_bytes']:,} | "
          f"{r['bytes_per_entry']:.2f} | {r['vs_bound']:.3f} | {'yes' if r['within_bound'] else 'NO'} | "
          f"{r['metadata_bytes']:,} | {r['save_s']:.2f} | {load} |"
      )
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001])
  ap.add_argument("--layers", type=int, default=32)
  ap.add_argument("--small", action="store_true", help="a narrow model (d=256, ffn=512, vocab=1000) for tests")
  ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "adapter_size.json"))
  ap.add_argument("--md", default=os.path.join(os.path.dirname(__file__), "results", "adapter_size.md"))
  args = ap.parse_args(argv)

  shapes = llama_shapes(args.layers, d=256, ffn=512, vocab=1000) if args.small else llama_shapes(args.layers)
  with tempfile.TemporaryDirectory() as workdir:
    results = [measure(shapes, d, workdir) for d in args.densities]
  table = markdown(results, args.layers)
  print(table)
  summary = {
      "model": f"Llama-2-7B shapes, {args.layers} layers" + (" (narrow: d=256)" if args.small else ""),
      "include": INCLUDE,
      "value_dtype": "float32",
      "jax": jax.__version__,
      "spra_jax": spra.__version__,
      "python": sys.version.split()[0],
      "results": results,
  }
  for path, text in ((args.json, json.dumps(summary, indent=2)), (args.md, table)):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w") as f:
        f.write(text + "\n")
  return summary


if __name__ == "__main__":
  main()
