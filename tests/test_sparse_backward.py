"""The fast backward: weight gradients computed at the mask only equal the dense gradient gathered there."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax import sparse_backward as sb
from spra_jax.masks import LeafMask
from spra_jax.models import llama

RTOL = 1e-5


def _close(got, want, rtol=RTOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-30)
  assert np.abs(got - want).max() / scale <= rtol, f"max relative error {np.abs(got - want).max() / scale:.3g}"


def _mask(shape, k, seed=0, blocks=None):
  if blocks is None:
    idx = np.sort(np.random.default_rng(seed).choice(int(np.prod(shape)), k, replace=False))
    return LeafMask.sparse(shape, jnp.asarray(idx, jnp.int32))
  # Shard-local: k / num_blocks entries per block, block-major, as sample_mask lays them out on sharded leaves.
  rng = np.random.default_rng(seed)
  (rows, cols), (br, bc) = shape, blocks
  per = k // (br * bc)
  out = []
  for i in range(br):
    for j in range(bc):
      local = rng.choice((rows // br) * (cols // bc), per, replace=False)
      r, c = np.divmod(np.sort(local), cols // bc)
      out.append((i * (rows // br) + r) * cols + j * (cols // bc) + c)
  return LeafMask.sparse(shape, jnp.asarray(np.concatenate(out), jnp.int32), blocks=blocks)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 4096, 64])  # one chunk; chunks of indices; chunks of tokens too
def test_sampled_grad_equals_the_dense_product_at_the_indices(chunk_bytes):
  x = jax.random.normal(jax.random.key(0), (3, 5, 24))
  dy = jax.random.normal(jax.random.key(1), (3, 5, 40))
  m = _mask((24, 40), 77)
  dense = jnp.einsum("...i,...o->io", x, dy).reshape(-1)[m.indices]
  _close(sb.sampled_grad(x, dy, m.indices, 40, chunk_bytes=chunk_bytes), dense)
  _close(sb.dense_grad(x, dy, m), dense)


def _attached_grads(params, mask, loss, backward):
  return jax.jit(spra.grad(lambda d: loss(spra.attach(params, d, backward=backward))))(spra.init_delta(mask)).values


@pytest.mark.parametrize("mode", ["sampled", "dense"])
@pytest.mark.parametrize("kind", ["uniform", "shard-local", "rows", "columns"])
def test_matmul_gradient_equals_dense_gradient_at_the_mask(mode, kind):
  params = {"w": jax.random.normal(jax.random.key(0), (96, 64)) / 8, "b": jnp.zeros(64)}
  x = jax.random.normal(jax.random.key(1), (4, 7, 96))
  if kind == "shard-local":
    mask = {"w": _mask((96, 64), 96, blocks=(2, 4)), "b": LeafMask.full((64,))}
  elif kind in ("rows", "columns"):
    dist = spra.masks.rows(0.05) if kind == "rows" else spra.masks.columns(0.05)
    mask = spra.sample_mask(jax.random.key(2), params, dist, full="b")
  else:
    mask = spra.sample_mask(jax.random.key(2), params, density=0.02, full="b")

  def loss(p):  # the weight is also used outside the matmul: both gradient paths add up
    return (jnp.tanh(sb.matmul(x, p["w"]) + p["b"]) ** 2).sum() + 0.1 * (p["w"] ** 2).sum()

  want = spra.compact.gather(jax.grad(loss)(params), mask)
  got = _attached_grads(params, mask, loss, sb.Backward(mode=mode, chunk_bytes=2048))
  _close(got["w"], want["w"])
  _close(got["b"], want["b"])


def test_the_sampled_path_forms_no_dense_weight_gradient():
  params = {"w": jax.random.normal(jax.random.key(0), (256, 512))}
  x = jax.random.normal(jax.random.key(1), (32, 256))
  mask = spra.sample_mask(jax.random.key(2), params, density=0.01)

  def compiled(mode):  # weights and input are arguments, so that XLA cannot fold the products away
    fn = jax.jit(spra.grad(lambda d, p, x: (sb.matmul(x, spra.attach(p, d, backward=mode)["w"]) ** 2).sum()))
    return fn.lower(spra.init_delta(mask), params, x).compile()

  sampled, dense = compiled("sampled"), compiled("dense")
  dots = lambda c: re.findall(r"= (f32\[[0-9,]*\])\{[^}]*\} dot\(", c.as_text())
  assert dots(dense) == ["f32[32,512]", "f32[256,512]"]  # the forward, and the weight gradient x^T dy
  assert dots(sampled) == ["f32[32,512]"]  # the forward only
  flops = lambda c: c.cost_analysis()["flops"]
  # forward 2 T in out (+ the loss); the dense path adds 2 T in out, the sampled path 2 T k.
  assert flops(sampled) < 0.55 * flops(dense)


def test_bf16_sampled_gradient_matches_float32_reference():
  w = (jax.random.normal(jax.random.key(0), (64, 96)) / 8).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (16, 64)).astype(jnp.bfloat16)
  mask = {"w": _mask((64, 96), 100)}
  loss = lambda p: sb.matmul(x, p["w"]).astype(jnp.float32).sum()
  got = _attached_grads({"w": w}, mask, loss, "sampled")["w"]
  assert got.dtype == jnp.float32
  want = jnp.einsum("ti,to->io", x.astype(jnp.float32), jnp.ones((16, 96))).reshape(-1)[mask["w"].indices]
  _close(got, want, rtol=1e-6)  # products of bf16 values summed in float32: exact up to float32 rounding


def test_only_traced_sparse_leaves_are_recorded():
  params = {"w": jnp.ones((8, 8)), "v": jnp.ones(8)}
  delta = spra.init_delta(spra.sample_mask(0, params, density=0.5))
  eager = spra.attach(params, delta)
  assert not sb.is_attached(eager["w"])  # outside a trace attach returns the weight itself: it keeps its own gradient
  # A weight that is not attached differentiates as usual through matmul.
  g = jax.grad(lambda w: sb.matmul(jnp.ones((2, 8)), w).sum())(params["w"])
  np.testing.assert_allclose(g, 2 * np.ones((8, 8)))


def test_cost_model_and_its_errors():
  assert sb.choose((1024, 1024), k=10_000, tokens=64) == "sampled"
  assert sb.choose((1024, 1024), k=100_000, tokens=64) == "dense"  # above 1 / gather_cost
  assert sb.choose((32, 32), k=1, tokens=64) == "dense"  # below min_size
  assert sb.choose((32, 32), k=1, tokens=64, backward="sampled") == "sampled"
  assert sb.choose((1024, 1024), k=100_000, tokens=64, backward=sb.Backward(gather_cost=2.0)) == "sampled"
  with pytest.raises(ValueError, match="mode must be one of"):
    sb.Backward(mode="fast")
  with pytest.raises(ValueError, match="gather_cost must be positive"):
    sb.Backward(gather_cost=0)
  with pytest.raises(TypeError, match="backward must be"):
    spra.attach({"w": jnp.ones(2)}, spra.init_delta({"w": LeafMask.full((2,))}), backward=3)


def test_lean_step_on_a_llama_model_takes_the_same_steps_either_way():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
  model = llama.build(config, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mask = spra.sample_mask(jax.random.key(0), params, density=0.05, include=r"proj/kernel", full=r"score")
  ids = jax.random.randint(jax.random.key(1), (4, 6), 0, 64)
  labels = jnp.array([0, 1, 1, 0])

  def loss_fn(p, ids, labels):
    logits = nnx.merge(graphdef, p, rest)(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  calls = []
  real = sb._masked_matmul

  def spy(*args):
    calls.append(args[-1][0])
    return real(*args)

  results = {}
  for mode in ("sampled", "dense"):
    step = spra.lean_step(loss_fn, optax.adam(1e-2), backward=mode)
    state = step.init(jax.tree.map(jnp.copy, params), mask)
    sb._masked_matmul = spy
    try:
      losses = []
      for _ in range(3):
        state, loss = step(state, ids, labels)
        losses.append(float(loss))
    finally:
      sb._masked_matmul = real
    results[mode] = (losses, step.flush(state).delta.values)
  # Every q/k/v/o/gate/up/down kernel went through the masked matmul, once per mode's trace.
  assert calls == ["sampled"] * 7 + ["dense"] * 7
  np.testing.assert_allclose(results["sampled"][0], results["dense"][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results["sampled"][1]), jax.tree.leaves(results["dense"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_whole_rows_and_columns_take_the_structured_product():
  x = jax.random.normal(jax.random.key(0), (12, 96))
  dy = jax.random.normal(jax.random.key(1), (12, 64))
  params = {"w": jnp.zeros((96, 64))}
  poison = lambda x, dy: jnp.full((k,), jnp.nan)  # the fallback must not be what answers
  for dist in (spra.masks.rows(0.05), spra.masks.columns(0.05)):
    m = spra.sample_mask(jax.random.key(2), params, dist)["w"]
    k = m.num_trainable
    want = (x.T @ dy).reshape(-1)[m.indices]
    _close(jax.jit(lambda x, dy, m=m: sb.structured_grad(x, dy, m, poison))(x, dy), want)
  # Scattered entries, k a multiple of both lengths: the check fails on the device and the fallback answers.
  m = _mask((96, 64), 96 * 64 // 32)
  k = m.num_trainable
  assert np.isnan(np.asarray(sb.structured_grad(x, dy, m, poison))).all()


def test_the_job_takes_the_choice_and_keeps_it_out_of_the_run_identity():
  from spra_jax.finetune import FinetuneConfig

  with pytest.raises(ValueError, match="sparse_backward must be 'auto', 'sampled' or 'dense', got 'fast'"):
    FinetuneConfig(sparse_backward="fast")
  # A cost choice, not a result: a run resumes with another one.
  assert FinetuneConfig(sparse_backward="dense").identity() == FinetuneConfig().identity()
