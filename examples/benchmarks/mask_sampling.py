"""Benchmark: sampling a 1 % mask over the shapes of a 7B-parameter Llama.

No weights are allocated: the parameters are ``jax.ShapeDtypeStruct``s. The
goal is under 30 s on a 2-core CPU with memory proportional to k (the number of
sampled entries), not to the 6.7 billion parameters.

Run:
  python examples/benchmarks/mask_sampling.py [--density 0.01] [--distribution uniform]
          [--layers 32] [--json examples/benchmarks/results/mask_sampling.json]

Prints a markdown table and writes JSON. Peak memory is the growth of the
process's peak resident set during sampling, set beside the bytes of the indices
the mask holds (4 bytes per sampled entry).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

import spra_jax as spra


def llama_shapes(layers: int = 32, d: int = 4096, ffn: int = 11008, vocab: int = 32000, dtype=jnp.bfloat16):
  """Parameter shapes of Llama-2-7B (HF names, kernels stored [in, out])."""
  sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  layer = {
      "self_attn": {n: {"kernel": sds(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {"gate_proj": {"kernel": sds(d, ffn)}, "up_proj": {"kernel": sds(d, ffn)}, "down_proj": {"kernel": sds(ffn, d)}},
      "input_layernorm": {"scale": sds(d)},
      "post_attention_layernorm": {"scale": sds(d)},
  }
  return {
      "embed_tokens": {"embedding": sds(vocab, d)},
      "layers": {str(i): layer for i in range(layers)},
      "norm": {"scale": sds(d)},
      "lm_head": {"kernel": sds(d, vocab)},
  }


def peak_rss_bytes() -> int:
  # ru_maxrss is KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--density", type=float, default=0.01)
  ap.add_argument("--distribution", default="uniform", choices=spra.masks.available())
  ap.add_argument("--layers", type=int, default=32)
  ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "mask_sampling.json"))
  args = ap.parse_args(argv)

  params = llama_shapes(layers=args.layers)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  dist = spra.masks.get(args.distribution, args.density)

  # Warm up the sampler's compilation on a small tree of the same leaf shapes,
  # so the figure separates compile time from sampling time.
  rss0 = peak_rss_bytes()
  t0 = time.perf_counter()
  spra.sample_mask(jax.random.key(1), llama_shapes(layers=1), dist)
  compile_s = time.perf_counter() - t0

  rss1 = peak_rss_bytes()
  t0 = time.perf_counter()
  mask = spra.sample_mask(jax.random.key(0), params, dist)
  jax.block_until_ready(mask)
  sample_s = time.perf_counter() - t0
  rss2 = peak_rss_bytes()

  k = spra.num_trainable(mask)
  index_bytes = 4 * k
  result = {
      "model": f"Llama-7B shapes ({args.layers} layers)",
      "parameters": int(n_params),
      "distribution": repr(dist),
      "trainable": int(k),
      "index_bytes": int(index_bytes),
      "warmup_and_compile_s": round(compile_s, 3),
      "sample_s": round(sample_s, 3),
      "peak_rss_growth_bytes": int(max(rss2 - rss1, 0)),
      "peak_rss_growth_over_index_bytes": round(max(rss2 - rss1, 0) / index_bytes, 2),
      "peak_rss_bytes": int(rss2),
      "baseline_rss_bytes": int(rss0),
      "goal_s": 30.0,
      "meets_goal": sample_s < 30.0,
      "jax": jax.__version__,
      "cpu_count": os.cpu_count(),
  }
  gib = 2**30
  print("| model | params | distribution | trainable k | sample time | compile | peak RSS growth | index bytes | growth / index bytes |")
  print("|---|---|---|---|---|---|---|---|---|")
  print(
      f"| {result['model']} | {n_params / 1e9:.2f} B | {result['distribution']} | {k:,} | {sample_s:.1f} s | {compile_s:.1f} s "
      f"| {result['peak_rss_growth_bytes'] / gib:.2f} GiB | {index_bytes / gib:.2f} GiB | {result['peak_rss_growth_over_index_bytes']}× |"
  )
  print(f"goal: under 30 s -> {'met' if result['meets_goal'] else 'MISSED'}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  sys.exit(0 if main()["meets_goal"] else 1)
