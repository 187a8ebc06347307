"""Mixed precision: bf16 weights that learn from updates below half their spacing, in both training doors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax import precision
from spra_jax.checkpoint import TrainCheckpointer

STEPS, LR = 200, 1e-3  # each step moves a trained entry by 1e-3, below half a bf16 spacing at 1.0 (3.9e-3)


@pytest.fixture(scope="module")
def bf16_case():
  base = {"w": (1.0 + 0.1 * jax.random.normal(jax.random.key(0), (16, 16))).astype(jnp.bfloat16)}
  mask = spra.sample_mask(jax.random.key(1), base, density=0.5)
  return base, mask, np.asarray(spra.to_dense(mask)["w"])


def _moved(new, base):
  return np.asarray(new, np.float32) - np.asarray(base, np.float32)


def _check_moved_by(new, base, trained, total):
  moved = _moved(new, base)
  # Each trained entry is round(base + total) in bf16: within half a spacing (at most 2^-7 near 1.2) of base + total.
  np.testing.assert_allclose(moved[trained], total, atol=2.0**-7)
  assert moved[trained].mean() == pytest.approx(total, abs=2.0**-8)
  # Frozen entries: bit-identical to the base.
  np.testing.assert_array_equal(np.asarray(new).view(np.uint16)[~trained], np.asarray(base).view(np.uint16)[~trained])


@pytest.mark.parametrize("masters", [True, False])
def test_masked_door_learns_below_half_a_bf16_spacing_with_masters(bf16_case, masters):
  base, mask, trained = bf16_case
  tx = spra.masked(optax.sgd(LR), mask, masters=masters)
  state = tx.init(base)
  assert (state.masters is not None) == masters
  grads = {"w": -jnp.ones((16, 16), jnp.bfloat16)}  # a constant gradient: each update is +1e-3

  @jax.jit
  def run(params, state):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, STEPS, body, (params, state))

  params, state = run(base, state)
  assert params["w"].dtype == jnp.bfloat16
  if masters:
    _check_moved_by(params["w"], base["w"], trained, STEPS * LR)
    # float32 masters: 200 float32 additions at ~1.2, each within half a float32 spacing (6e-8).
    np.testing.assert_allclose(state.masters["w"], np.asarray(base["w"], np.float32)[trained] + STEPS * LR, atol=2e-5)
    # The weights are exactly the masters rounded once.
    np.testing.assert_array_equal(np.asarray(params["w"])[trained], np.asarray(state.masters["w"].astype(jnp.bfloat16)))
  else:  # the rounding this issue is about: every update is lost
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(base["w"]))


@pytest.mark.parametrize("masters", [True, False])
def test_lean_door_writes_round_base_plus_delta(bf16_case, masters):
  base, mask, trained = bf16_case
  step = spra.lean_step(lambda p, x: (p["w"].astype(jnp.float32) * x).sum(), optax.sgd(LR), masters=masters)
  state = step.init(jax.tree.map(jnp.copy, base), mask)
  assert (state.base is not None) == masters
  x = -jnp.ones((16, 16))
  for _ in range(STEPS):
    state, _ = step(state, x)
  state = step.flush(state)
  np.testing.assert_allclose(state.delta.values["w"], STEPS * LR, rtol=1e-5)  # the float32 delta always learns
  if masters:
    _check_moved_by(state.params["w"], base["w"], trained, STEPS * LR)
    # The weights equal merge(base, delta) bit for bit: the trained entries were rounded once.
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(spra.merge(base, state.delta)["w"]))
  else:
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(base["w"]))


def test_float32_params_are_unchanged_by_masters(params):
  """No masters and no base entries for float32 trees: the state is what it was before mixed precision."""
  mask = spra.sample_mask(0, params, density=0.1)
  assert spra.masked(optax.adam(1e-3), mask).init(params).masters is None
  assert spra.lean_step(lambda p: 0.0, optax.adam(1e-3), jit=False).init(params, mask).base is None


def test_masked_state_bound_for_bf16_params_with_masters():
  """16 bytes per trained entry (indices, masters, two float32 moments) against dense AdamW's."""
  params = {f"w{i}": jnp.zeros((128, 128), jnp.bfloat16) for i in range(3)}
  total = 3 * 128 * 128
  for density in (0.001, 0.01, 0.1):
    state = spra.masked(optax.adamw(1e-3), density=density, key=0).init(params)
    k = spra.num_trainable(spra.mask_of(state))
    sparse_bytes = spra.recipes.tree_bytes(state)
    assert sparse_bytes == 16 * k + 4  # + AdamW's int32 count
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.inner_state[0].mu))
    # Against dense mixed-precision AdamW (float32 moments and a float32 master of every weight): 12 bytes per entry.
    mixed_bytes = spra.recipes.tree_bytes(precision.float32_state(optax.adamw(1e-3)).init(params)) + 4 * total
    assert sparse_bytes / mixed_bytes <= 1.4 * density
    # Against AdamW with bf16 moments (optax's default for bf16 params, no masters): 4 bytes per entry.
    bf16_bytes = spra.recipes.tree_bytes(optax.adamw(1e-3).init(params))
    assert sparse_bytes / bf16_bytes <= 4.1 * density


def test_bf16_resume_is_bit_exact_in_both_doors(tmp_path, bf16_case):
  base, mask, _ = bf16_case
  x = jax.random.normal(jax.random.key(2), (4, 16))
  loss = lambda p, x: ((x @ p["w"].astype(jnp.float32)) ** 2).mean()
  lean = spra.lean_step(loss, optax.adamw(1e-3))

  def lean_run(state, steps):
    for _ in range(steps):
      state, _ = lean(state, x)
    return state

  straight = lean.flush(lean_run(lean.init(jax.tree.map(jnp.copy, base), mask), 6))
  with TrainCheckpointer(tmp_path / "lean") as ckpt:
    ckpt.save(3, lean_run(lean.init(jax.tree.map(jnp.copy, base), mask), 3))
    ckpt.wait_until_finished()
    restored = ckpt.restore(lean.init(jax.tree.map(jnp.copy, base), mask), base_params=base).state
  resumed = lean.flush(lean_run(restored, 3))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  tx = spra.masked(optax.adamw(1e-3), mask)
  update = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p, x), s, p)))

  def masked_run(p, s, steps):
    for _ in range(steps):
      p, s = update(p, s)
    return p, s

  straight = masked_run(base, tx.init(base), 6)
  with TrainCheckpointer(tmp_path / "masked") as ckpt:
    ckpt.save(3, masked_run(base, tx.init(base), 3))
    ckpt.wait_until_finished()
    restored = ckpt.restore((base, tx.init(base))).state
  assert restored[1].masters["w"].dtype == jnp.float32
  resumed = masked_run(*restored, 3)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lean_resume_from_a_delta_needs_the_base_for_bf16(bf16_case):
  base, mask, _ = bf16_case
  step = spra.lean_step(lambda p: 0.0, optax.sgd(1.0), jit=False)
  delta = spra.init_delta(mask).replace(values={"w": jnp.full(spra.num_trainable(mask), 1e-3)})
  tuned = spra.merge(base, delta)
  with pytest.raises(ValueError, match="needs base="):
    step.init(tuned, delta)
  state = step.init(tuned, delta, base=base)
  np.testing.assert_array_equal(np.asarray(state.base["w"]), np.asarray(base["w"]).reshape(-1)[np.asarray(mask["w"].indices)])


def test_bf16_adapter_loads_into_a_float32_base(tmp_path, bf16_case):
  """The delta is float32 whatever the weights' dtype: a float32 copy of the base takes it (fingerprints match)."""
  base, mask, _ = bf16_case
  delta = spra.init_delta(mask).replace(values={"w": jnp.full(spra.num_trainable(mask), 1e-3)})
  spra.save_adapter(tmp_path / "adapter", delta, base_fingerprint=spra.checkpoint.base_fingerprint(base, mask))
  base32 = jax.tree.map(lambda w: w.astype(jnp.float32), base)
  loaded = spra.load_adapter(tmp_path / "adapter", base_params=base32)
  assert loaded.values["w"].dtype == jnp.float32
  merged = spra.merge(base32, loaded)
  assert merged["w"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(merged["w"]), np.asarray(spra.merge(base32, delta)["w"]))


@pytest.mark.parametrize("accum", [2, 4])
def test_lean_microbatches_sum_compact_gradients_like_one_batch(accum):
  params = {"w": jax.random.normal(jax.random.key(3), (8, 4)), "b": jnp.zeros(4)}
  mask = spra.sample_mask(0, params, density=0.5, full="b")
  x, y = jax.random.normal(jax.random.key(4), (8, 8)), jax.random.normal(jax.random.key(5), (8, 4))
  loss = lambda p, x, y: ((x @ p["w"] + p["b"] - y) ** 2).mean()
  one = spra.lean_step(loss, optax.adam(1e-2))
  many = spra.lean_step(loss, optax.adam(1e-2), microbatches=accum)
  s1, s2 = one.init(jax.tree.map(jnp.copy, params), mask), many.init(jax.tree.map(jnp.copy, params), mask)
  for _ in range(3):
    (s1, l1), (s2, l2) = one(s1, x, y), many(s2, x, y)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.delta.values), jax.tree.leaves(s2.delta.values)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="divisible by 3"):
    spra.lean_step(loss, optax.adam(1e-2), microbatches=3)(s2, x, y)
  with pytest.raises(ValueError, match=">= 1"):
    spra.lean_step(loss, optax.adam(1e-2), microbatches=0)


def test_float_dtype_names_what_it_accepts():
  assert precision.float_dtype("bfloat16") == jnp.bfloat16
  assert precision.float_dtype(jnp.float32) == jnp.float32
  for bad in ("int8", "float64", "bf16x", None):
    with pytest.raises(ValueError, match=r"must be one of \['float32', 'bfloat16', 'float16'\]"):
      precision.float_dtype(bad, what="--param-dtype")


def test_job_fine_tunes_a_tiny_llama_in_bf16_with_microbatches(tmp_path, tiny_llama_dir):
  import json
  import pathlib
  import sys

  from flax import nnx

  from spra_jax.finetune import FinetuneConfig, finetune

  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from finetune_worker import write_reviews_csv

  csv = tmp_path / "reviews.csv"
  write_reviews_csv(csv)
  cfg = FinetuneConfig(model=str(tiny_llama_dir), dataset=str(csv), method="spra", density=0.05, lr=1e-3, steps=4,
                       batch_size=8, grad_accum_steps=2, max_length=16, eval_every=4, eval_examples=16,
                       test_examples=16, checkpoint_every=2, param_dtype="bfloat16", compute_dtype="bfloat16",
                       output=str(tmp_path / "run"))
  results = finetune(cfg, progress=False)
  out = pathlib.Path(cfg.output)
  saved = json.loads((out / "config.json").read_text())
  assert (saved["param_dtype"], saved["compute_dtype"], saved["grad_accum_steps"]) == ("bfloat16", "bfloat16", 2)
  assert (results["param_dtype"], results["compute_dtype"]) == ("bfloat16", "bfloat16")
  losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]
  assert len(losses) == 4 and all(np.isfinite(losses))
  # The adapter holds float32 values (the bf16 weights took round(base + delta)), and it fits the base loaded in
  # bfloat16 and in float32 alike (the fingerprint is taken at bf16 precision).
  for dtype in ("bfloat16", "float32"):
    model, _ = spra.models.from_pretrained(tiny_llama_dir, task="sequence-classification", num_labels=2,
                                           param_dtype=dtype, seed=cfg.seed)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    delta = spra.load_adapter(out / "adapter", base_params=base)
    values = jax.tree.leaves(delta.values)
    assert all(v.dtype == jnp.float32 for v in values)
    assert any(float(jnp.abs(v).max()) > 0 for v in values)


def test_the_job_config_checks_its_precision_and_accumulation_fields():
  from spra_jax.finetune import FinetuneConfig, validate

  assert FinetuneConfig(param_dtype=jnp.bfloat16).param_dtype == "bfloat16"  # a dtype is stored by its name
  with pytest.raises(ValueError, match=r"param_dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'int8'"):
    FinetuneConfig(param_dtype="int8")
  with pytest.raises(ValueError, match="grad_accum_steps must be a positive integer"):
    FinetuneConfig(grad_accum_steps=0)
  with pytest.raises(ValueError, match="batch_size 30 must be a multiple of grad_accum_steps 4"):
    FinetuneConfig(batch_size=30, grad_accum_steps=4)
  # None resolves to the backend's default (float32 on this CPU), and validate says so.
  checked = validate(FinetuneConfig(compute_dtype="bfloat16"))
  assert (checked.config.param_dtype, checked.config.compute_dtype) == ("float32", "bfloat16")
  assert checked.dtype_source == "given and the default on cpu"


def test_a_backend_that_cannot_compute_in_a_dtype_is_refused_before_loading(monkeypatch):
  from spra_jax.finetune import FinetuneConfig, checks

  real_ones = checks.jnp.ones

  def ones(shape, dtype=None):  # a backend without bf16 kernels fails on the first bf16 computation
    if jnp.dtype(dtype) == jnp.bfloat16:
      raise RuntimeError("UNIMPLEMENTED: bf16 dot")
    return real_ones(shape, dtype)

  monkeypatch.setattr(checks.jnp, "ones", ones)
  with pytest.raises(ValueError, match=r"the cpu backend cannot compute in bfloat16 here \(RuntimeError: UNIMPLEMENTED"):
    checks.validate(FinetuneConfig(param_dtype="bfloat16"))
  checks.validate(FinetuneConfig(param_dtype="float32"))


@pytest.mark.parametrize("method", ["spra", "head", "lora", "full"])
def test_every_method_trains_bf16_weights_with_bf16_compute(method):
  from flax import nnx

  class Classifier(nnx.Module):
    def __init__(self, rngs):
      opts = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
      self.body = nnx.Linear(16, 16, **opts)
      self.classifier = nnx.Linear(16, 2, **opts)

    def __call__(self, x, attention_mask=None):
      return self.classifier(jnp.tanh(self.body(x)))

  x = jax.random.normal(jax.random.key(0), (16, 16))
  batch = {"input_ids": x, "attention_mask": None, "labels": (x[:, 0] > 0).astype(jnp.int32)}
  run = spra.recipes.prepare(Classifier(nnx.Rngs(0)), method, tx=optax.adam(3e-2), task="classification",
                             density=0.25, rules={"include": "body"}, microbatches=2)
  state = run.init()
  losses = []
  for _ in range(8):
    state, loss = run.step(state, batch)
    assert loss.dtype == jnp.float32  # the loss is float32 over bf16 logits
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  state, predict = run.predictor(state)
  assert predict(batch).dtype == jnp.bfloat16
  weights = jax.tree.leaves(run.trained_variables(state))
  if method in ("spra", "head"):
    assert all(w.dtype == jnp.bfloat16 for w in weights) and state.base is not None
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.delta.values))
  else:
    opt_state = state[1]
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(opt_state) if m.ndim)  # float32 moments
  if method == "lora":
    trained = run.trained_variables(state)
    lora = [v for p, v in nnx.to_flat_state(trained) if "lora" in "/".join(map(str, p))]
    assert lora and all(v.get_value().dtype == jnp.float32 for v in lora)
