"""A small Llama-shaped causal LM in pure JAX whose parameter paths follow the models contract.

Paths: ``model/embed_tokens/embedding``, ``model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel``,
``model/layers/<i>/mlp/{gate,up,down}_proj/kernel``, ``model/layers/<i>/{input,post_attention}_layernorm/scale``,
``model/norm/scale``, ``lm_head/kernel``; kernels stored [in, out]. Real attention (causal, rotary, grouped-query)
and a SwiGLU MLP, next-token cross-entropy. Every matrix is 64 x 64 by default (4 heads of 16, as many KV heads,
MLP width 64, vocabulary 64): one shape keeps the number of distinct compilations, which dominate the tests'
run time on CPU, small; ``kv_heads`` < ``heads`` (grouped-query attention) works too. The projections multiply
through ``spra.sparse_backward.matmul``, so a lean step may take the sampled weight gradient (``backward=``).
"""

import math

import jax
import jax.numpy as jnp
import optax

from spra_jax.sparse_backward import matmul


def init_params(seed=0, *, vocab=64, d=64, layers=2, heads=4, kv_heads=4, ffn=64):
  keys = iter(jax.random.split(jax.random.key(seed), 8 * layers + 2))
  head_dim = d // heads

  def dense(shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(shape[0])

  def layer():
    return {
        "self_attn": {"q_proj": {"kernel": dense((d, heads * head_dim))},
                      "k_proj": {"kernel": dense((d, kv_heads * head_dim))},
                      "v_proj": {"kernel": dense((d, kv_heads * head_dim))},
                      "o_proj": {"kernel": dense((heads * head_dim, d))}},
        "mlp": {"gate_proj": {"kernel": dense((d, ffn))}, "up_proj": {"kernel": dense((d, ffn))},
                "down_proj": {"kernel": dense((ffn, d))}},
        "input_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
        "post_attention_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
    }

  return {
      "model": {
          "embed_tokens": {"embedding": jax.random.normal(next(keys), (vocab, d), jnp.float32) * 0.5},
          "layers": [layer() for _ in range(layers)],
          "norm": {"scale": jnp.ones((d,), jnp.float32)},
      },
      "lm_head": {"kernel": dense((d, vocab))},
  }


def rms_norm(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotary(x, theta=10000.0):
  seq, head_dim = x.shape[1], x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def logits_fn(params, tokens, *, heads=4, kv_heads=4):
  h = params["model"]["embed_tokens"]["embedding"][tokens]
  b, s, d = h.shape
  head_dim = d // heads
  causal = jnp.tril(jnp.ones((s, s), bool))
  for p in params["model"]["layers"]:
    att = p["self_attn"]
    x = rms_norm(h, p["input_layernorm"]["scale"])
    q = rotary(matmul(x, att["q_proj"]["kernel"]).reshape(b, s, heads, head_dim))
    k = rotary(matmul(x, att["k_proj"]["kernel"]).reshape(b, s, kv_heads, head_dim))
    v = matmul(x, att["v_proj"]["kernel"]).reshape(b, s, kv_heads, head_dim)
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, heads * head_dim)
    h = h + matmul(attn, att["o_proj"]["kernel"])
    x = rms_norm(h, p["post_attention_layernorm"]["scale"])
    mlp = p["mlp"]
    h = gated = jax.nn.silu(matmul(x, mlp["gate_proj"]["kernel"])) * matmul(x, mlp["up_proj"]["kernel"])
    h = h + matmul(gated, mlp["down_proj"]["kernel"])
  return rms_norm(h, params["model"]["norm"]["scale"]) @ params["lm_head"]["kernel"]


def loss_fn(params, tokens):
  logits = logits_fn(params, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def batches(n, *, batch=8, seq=16, vocab=64, seed=1):
  """``n`` token batches [batch, seq + 1] with some structure to learn (repeating runs)."""
  key = jax.random.key(seed)
  out = []
  for i in range(n):
    start = jax.random.randint(jax.random.fold_in(key, i), (batch, 1), 0, vocab, jnp.int32)
    out.append((start + jnp.arange(seq + 1, dtype=jnp.int32)[None, :] // 2) % vocab)
  return out
