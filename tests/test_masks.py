"""Mask sampling: counts, uniformity, determinism, independence, filters, errors."""

import contextlib
import itertools
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spra_jax as spra
from spra_jax import masks
from spra_jax.masks import LeafMask



def leaf_masks(mask):
  return {masks.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=masks.is_leaf_mask)[0]}


def assert_valid_indices(m: LeafMask):
  idx = np.asarray(m.indices)
  assert idx.dtype == np.int32 and idx.ndim == 1
  if idx.size:
    assert idx[0] >= 0 and idx[-1] < m.size
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"


# ----------------------------------------------------------------- counts


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.3, 0.9, 1.0])
def test_uniform_gives_exact_count_per_leaf(density):
  params = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((7, 11, 13)), "c": jnp.zeros(50)}
  # At 0.001, 'c' gets round(0.05) = 0 entries: it is frozen, with a warning.
  with pytest.warns(UserWarning, match=r"'c' \(50 entries\)") if density == 0.001 else contextlib.nullcontext():
    mask = spra.sample_mask(jax.random.key(3), params, spra.masks.uniform(density))
  for path, m in leaf_masks(mask).items():
    k = math.floor(density * m.size + 0.5)
    assert m.kind == (masks.SPARSE if k else masks.FROZEN)
    assert m.num_trainable == k, path
    if k:
      assert_valid_indices(m)


def test_uniform_covers_sparse_and_dense_regimes_and_the_fallback(monkeypatch):
  # Sparse regime with no oversampling margin: a single draw of k values has
  # k distinct ones only 5 % (n=101) or 38 % (n=37) of the time, so the
  # while-loop redraw is what makes the count exact.
  monkeypatch.setattr(masks._choice, "_oversample_margin", lambda n, k: 0)
  for n, k in [(101, 25), (37, 9)]:
    idx = np.asarray(masks._choose_sorted(jax.random.key(n), n, k))
    assert idx.shape == (k,) and len(np.unique(idx)) == k and idx.max() < n
  # Dense regime and the k == n shortcut.
  assert np.array_equal(masks._choose_sorted(jax.random.key(0), 10, 10), np.arange(10))
  dense = np.asarray(masks._choose_sorted(jax.random.key(0), 100, 60))
  assert dense.shape == (60,) and len(np.unique(dense)) == 60


@pytest.mark.parametrize("n,k", [(12, 3), (16, 9)])  # sparse and dense regimes
def test_uniform_subsets_are_uniform(n, k):
  """Every k-subset is equally likely (chi-square over all subsets)."""
  draws = 30_000
  keys = jax.random.split(jax.random.key(7), draws)
  samples = np.asarray(jax.vmap(lambda key: masks._choose_padded(key, n, k, k))(keys))
  subsets = list(itertools.combinations(range(n), k))
  if len(subsets) > 1000:  # Too many subsets to count: test marginals and pairs.
    marg = np.bincount(samples.ravel(), minlength=n) / draws
    np.testing.assert_allclose(marg, k / n, atol=0.015)
    return
  index = {s: i for i, s in enumerate(subsets)}
  counts = np.bincount([index[tuple(s)] for s in samples], minlength=len(subsets))
  expected = draws / len(subsets)
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  dof = len(subsets) - 1
  # A 6-sigma bound on a chi-square with `dof` degrees of freedom.
  assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_bernoulli_count_is_random_with_the_right_mean():
  params = {"w": jnp.zeros((200, 100))}
  counts = []
  for seed in range(30):
    m = spra.sample_mask(seed, params, spra.masks.bernoulli(0.05))["w"]
    assert_valid_indices(m)
    counts.append(m.num_trainable)
  assert len(set(counts)) > 5, "Bernoulli counts should vary between keys"
  mean, sd = np.mean(counts), math.sqrt(20000 * 0.05 * 0.95)
  assert abs(mean - 1000) < 4 * sd / math.sqrt(len(counts))


def test_bernoulli_inside_jit_with_a_traced_key_says_what_to_do():
  params = {"w": jnp.zeros((20, 20))}
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda k: spra.sample_mask(k, params, spra.masks.bernoulli(0.1)))(jax.random.key(0))


# ----------------------------------------------------------- determinism


def _digest(mask):
  return {p: np.asarray(m.indices).tobytes().hex()[:64] + str(m.num_trainable) for p, m in leaf_masks(mask).items() if m.kind == masks.SPARSE}


def test_same_key_same_mask_and_different_keys_differ(params):
  a = spra.sample_mask(jax.random.key(1), params, density=0.1)
  b = spra.sample_mask(jax.random.key(1), params, density=0.1)
  c = spra.sample_mask(jax.random.key(2), params, density=0.1)
  assert _digest(a) == _digest(b)
  assert all(_digest(a)[p] != _digest(c)[p] for p in _digest(a))


def test_int_seed_and_legacy_key_match_typed_key(params):
  typed = spra.sample_mask(jax.random.key(5), params, density=0.1)
  assert _digest(spra.sample_mask(5, params, density=0.1)) == _digest(typed)
  assert _digest(spra.sample_mask(jax.random.PRNGKey(5), params, density=0.1)) == _digest(typed)


def test_same_mask_in_another_process():
  code = textwrap.dedent(
      """
      import jax, jax.numpy as jnp, numpy as np, hashlib
      import spra_jax as spra
      params = {'x': {'w': jnp.zeros((300, 70))}, 'y': jnp.zeros((1000,))}
      for dist in (spra.masks.uniform(0.05), spra.masks.bernoulli(0.05)):
          m = spra.sample_mask(jax.random.key(11), params, dist)
          print(hashlib.sha256(b''.join(np.asarray(l).tobytes() for l in jax.tree.leaves(m))).hexdigest())
      """
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  import hashlib

  params = {"x": {"w": jnp.zeros((300, 70))}, "y": jnp.zeros((1000,))}
  here = []
  for dist in (spra.masks.uniform(0.05), spra.masks.bernoulli(0.05)):
    m = spra.sample_mask(jax.random.key(11), params, dist)
    here.append(hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(m))).hexdigest())
  assert out == here


def test_leaves_are_independent_of_other_leaves():
  key = jax.random.key(0)
  base = {"a": jnp.zeros((40, 40)), "b": jnp.zeros((10, 30))}
  grown = {"z": jnp.zeros((5, 5)), "b": jnp.zeros((10, 30)), "a": jnp.zeros((40, 40)), "c": jnp.zeros(99)}
  shrunk = {"a": jnp.zeros((40, 40))}
  nested = {"outer": {"a": jnp.zeros((40, 40))}}
  ref = spra.sample_mask(key, base, density=0.1)["a"].indices
  np.testing.assert_array_equal(spra.sample_mask(key, grown, density=0.1)["a"].indices, ref)
  np.testing.assert_array_equal(spra.sample_mask(key, shrunk, density=0.1)["a"].indices, ref)
  # The key depends on the path: a leaf at another path gets another mask.
  assert not np.array_equal(spra.sample_mask(key, nested, density=0.1)["outer"]["a"].indices, ref)


def test_shape_structs_give_the_same_mask_as_arrays(params):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert _digest(spra.sample_mask(3, abstract, density=0.1)) == _digest(spra.sample_mask(3, params, density=0.1))


def test_sampling_under_jit_matches_eager(params):
  eager = spra.sample_mask(jax.random.key(9), params, density=0.05)
  jitted = jax.jit(lambda k: spra.sample_mask(k, params, density=0.05))(jax.random.key(9))
  assert _digest(jitted) == _digest(eager)


def test_nnx_state_paths_drop_the_variable_value_suffix():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.v_proj = nnx.Linear(8, 8, rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  mask = spra.sample_mask(0, state, density=0.25, include=r"v_proj/kernel$", full=r"^head/")
  kinds = {p: m.kind for p, m in leaf_masks(mask).items()}
  assert kinds == {"head/bias": "full", "head/kernel": "full", "v_proj/bias": "frozen", "v_proj/kernel": "sparse"}


# ---------------------------------------------------------------- filters


def test_include_exclude_full_and_non_floating_leaves(params):
  mask = spra.sample_mask(0, params, density=0.1, include=r"attn|mlp", exclude=r"q_proj", full=r"^head/")
  kinds = {p: m.kind for p, m in leaf_masks(mask).items()}
  assert kinds["head/kernel"] == "full"
  assert kinds["position_ids"] == "frozen"  # int leaves never train
  assert kinds["layers/0/attn/q_proj/kernel"] == "frozen"
  assert kinds["layers/1/attn/v_proj/kernel"] == "sparse"
  assert kinds["layers/0/mlp/bias"] == "sparse"
  # A list of patterns works like an alternation.
  listed = spra.sample_mask(0, params, density=0.1, include=["attn", "mlp"], exclude="q_proj", full="^head/")
  assert _digest(listed) == _digest(mask)


def test_full_wins_over_exclude(params):
  mask = spra.sample_mask(0, params, density=0.1, exclude="head", full="head")
  assert mask["head"]["kernel"].kind == "full"


def test_num_trainable_and_summary(params):
  mask = spra.sample_mask(0, params, density=0.1, include="v_proj", full="head")
  expected = 2 * round(0.1 * 32 * 32) + 32 * 3
  assert spra.num_trainable(mask) == expected
  text = spra.mask_summary(mask)
  assert "layers/0/attn/v_proj/kernel" in text and "sparse" in text and "9.961%" in text
  assert text.splitlines()[-1].startswith("total") and f"{expected:,} trainable" in text
  assert "q_proj" not in spra.mask_summary(mask, show_frozen=False)
  rows = masks.summary_rows(mask)
  assert sum(r["trainable"] for r in rows) == expected


# ------------------------------------------------------------- allocation


def test_equal_allocation_splits_evenly_and_caps_small_leaves():
  params = {"big": jnp.zeros((100, 100)), "mid": jnp.zeros((50, 50)), "tiny": jnp.zeros(10)}
  mask = spra.sample_mask(0, params, spra.masks.uniform(0.01, allocation="equal"))
  counts = {p: m.num_trainable for p, m in leaf_masks(mask).items()}
  total = round(0.01 * (10000 + 2500 + 10))
  assert sum(counts.values()) == total  # 125
  assert counts["tiny"] == 10  # capped at its size; the excess goes to the others
  assert abs(counts["big"] - counts["mid"]) <= 1


def test_mapping_allocation_sets_per_leaf_densities(params):
  dist = spra.masks.uniform(0.01, allocation={r"v_proj": 0.25, r"mlp/kernel": 0.5})
  mask = spra.sample_mask(0, params, dist)
  lm = leaf_masks(mask)
  assert lm["layers/0/attn/v_proj/kernel"].num_trainable == 256
  assert lm["layers/1/mlp/kernel"].num_trainable == 1024
  assert lm["layers/0/attn/q_proj/kernel"].num_trainable == 10  # 1 % default


def test_callable_allocation_and_its_errors():
  params = {"a": jnp.zeros(100), "b": jnp.zeros(100)}
  first_only = lambda paths, sizes, total: [total if p == "a" else 0 for p in paths]
  with pytest.warns(UserWarning, match="'b' \\(100 entries\\)"):  # a budget of 0 freezes the leaf
    mask = spra.sample_mask(0, params, spra.masks.uniform(0.1, allocation=first_only))
  assert mask["a"].num_trainable == 20 and mask["b"].num_trainable == 0 and mask["b"].kind == masks.FROZEN
  with pytest.raises(ValueError, match="'a' a budget of 500"):
    spra.sample_mask(0, params, spra.masks.uniform(0.1, allocation=lambda p, s, t: [500, 0]))


def test_relative_to_model_counts_against_all_entries_and_charges_full_leaves():
  # 10,000 attention entries, 90,000 elsewhere, a 1,000-entry head.
  params = {"v_proj": jnp.zeros((100, 100)), "mlp": jnp.zeros((300, 300)), "score": jnp.zeros((500, 2))}
  dist = spra.masks.uniform(0.02, relative_to="model")
  mask = spra.sample_mask(0, params, dist, include="v_proj", full="score")
  # budget = 2 % of 101,000 = 2,020; the head takes 1,000; v_proj gets 1,020.
  assert mask["v_proj"].num_trainable == 1020
  assert spra.num_trainable(mask) == 2020
  with pytest.raises(ValueError, match="only 10,000 entries"):
    spra.sample_mask(0, params, spra.masks.uniform(0.2, relative_to="model"), include="v_proj", full="score")
  with pytest.raises(ValueError, match="smaller than the 1,000 entries"):
    spra.sample_mask(0, params, spra.masks.uniform(0.005, relative_to="model"), include="v_proj", full="score")


# ------------------------------------------------------------ registry


def test_a_new_distribution_is_one_small_class():
  @masks.register
  class EveryOther(masks.Distribution):
    name = "every-other-test"

    def sample(self, key, path, shape, budget):
      return jnp.arange(0, 2 * budget, 2, dtype=jnp.int32)

  assert "every-other-test" in masks.available()
  mask = spra.sample_mask(0, {"w": jnp.zeros(100)}, distribution="every-other-test", density=0.1)
  assert mask["w"].indices.tolist() == list(range(0, 20, 2))
  assert masks.get("every-other-test", 0.1).spec() == {
      "name": "every-other-test", "density": 0.1, "allocation": "proportional", "relative_to": "eligible"}


# --------------------------------------------------------- dense <-> mask


def test_from_dense_and_to_dense_round_trip(params):
  mask = spra.sample_mask(0, params, density=0.2, full="head")
  dense = spra.to_dense(mask)
  assert int(dense["layers"][0]["mlp"]["kernel"].sum()) == mask["layers"][0]["mlp"]["kernel"].num_trainable
  back = spra.from_dense(jax.tree.map(np.asarray, dense))
  assert _digest(back) == _digest(mask)
  assert back["head"]["kernel"].kind == "full"
  assert back["position_ids"].kind == "frozen"


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_is_rejected(density):
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
    spra.masks.uniform(density)


def test_bad_density_type_is_rejected():
  with pytest.raises(TypeError, match="density must be a number"):
    spra.masks.uniform(True)
  with pytest.raises(TypeError, match="density must be a number"):
    spra.masks.uniform("0.1")


def test_filters_that_match_nothing_name_the_paths(params):
  with pytest.raises(ValueError, match=r"include='o_proj' matches no leaf; leaf paths look like 'head/kernel'"):
    spra.sample_mask(0, params, density=0.1, include="o_proj")


def test_empty_selection_is_an_error(params):
  with pytest.raises(ValueError, match="no floating-point leaf is left to train"):
    spra.sample_mask(0, params, density=0.1, include="position_ids")
  with pytest.raises(ValueError, match="no floating-point leaf is left to train"):
    spra.sample_mask(0, params, density=0.1, include="attn", exclude="attn")


def test_a_density_too_small_to_select_anything_is_an_error():
  with pytest.raises(ValueError, match="selects no entry of the 100 eligible entries"):
    spra.sample_mask(0, {"w": jnp.zeros(100)}, density=0.001)


def test_missing_density_unknown_name_and_conflicts():
  params = {"w": jnp.zeros(10)}
  with pytest.raises(ValueError, match="a density is needed"):
    spra.sample_mask(0, params)
  with pytest.raises(ValueError, match="unknown mask distribution 'gaussian'; available: bernoulli"):
    spra.sample_mask(0, params, "gaussian", density=0.1)
  with pytest.raises(ValueError, match="conflicts with the distribution's own density"):
    spra.sample_mask(0, params, spra.masks.uniform(0.1), density=0.2)


def test_bad_keys_are_rejected():
  with pytest.raises(TypeError, match="key must be a PRNG key"):
    spra.sample_mask("seed", {"w": jnp.zeros(10)}, density=0.5)
  with pytest.raises(TypeError, match="legacy uint32"):
    spra.sample_mask(jnp.zeros(3, jnp.float32), {"w": jnp.zeros(10)}, density=0.5)


def test_leaves_beyond_int32_indexing_are_rejected():
  huge = {"emb": jax.ShapeDtypeStruct((2**16, 2**16), jnp.bfloat16)}
  with pytest.raises(ValueError, match="leaf 'emb' has 4,294,967,296 entries"):
    spra.sample_mask(0, huge, density=0.01)


def test_validate_names_the_leaf_and_the_problem(params):
  mask = spra.sample_mask(0, params, density=0.1)
  with pytest.raises(ValueError, match=r"parameters without a mask leaf: 'extra'"):
    masks.validate(mask, {**params, "extra": jnp.zeros(3)})
  bad_shape = {**params, "head": {"kernel": jnp.zeros((32, 4))}}
  with pytest.raises(ValueError, match=r"mask leaf 'head/kernel' has shape \(32, 3\) but the parameter has shape \(32, 4\)"):
    masks.validate(mask, bad_shape)
  for indices, message in [
      (jnp.array([3, 1], jnp.int32), "sorted and unique"),
      (jnp.array([1, 1], jnp.int32), "sorted and unique"),
      (jnp.array([0, 96], jnp.int32), r"in \[0, 96\)"),
      (jnp.array([0, 1], jnp.int64 if jax.config.jax_enable_x64 else jnp.float32), "1-D int32"),
  ]:
    broken = {**mask, "head": {"kernel": LeafMask.sparse((32, 3), indices)}}
    with pytest.raises(ValueError, match=message):
      masks.validate(broken, params)
  int_trained = {**mask, "position_ids": LeafMask.full((16,))}
  with pytest.raises(ValueError, match="non-floating dtype int32"):
    masks.validate(int_trained, params)



def test_relayout_leaf_keeps_the_entries_and_refuses_uneven_grids():
  from spra_jax.masks import layout

  rng = np.random.default_rng(0)
  # A shard-local leaf of 4 row blocks x 2 column blocks, 3 entries in each block.
  shape, blocks = (8, 6), (4, 2)
  picks = []
  for b in range(8):
    r, c = divmod(b, 2)
    local = np.sort(rng.choice(6, 3, replace=False))
    picks += [(2 * r + i // 3) * 6 + 3 * c + i % 3 for i in local]
  m = spra.LeafMask.sparse(shape, jnp.asarray(picks, jnp.int32), blocks=blocks)
  spra.masks.validate_indices("w", m, check_values=True)
  for target in ((2, 2), (4, 1), (1, 2), (2, 1), None):  # unions of the mask's own blocks
    new, perm = layout.relayout_leaf(m, target)
    assert new.blocks == (None if target is None or target == (1, 1) else target)
    spra.masks.validate_indices("w", new, check_values=True)
    np.testing.assert_array_equal(np.asarray(new.indices), np.asarray(m.indices)[perm])
    assert sorted(np.asarray(new.indices).tolist()) == sorted(picks)
  uneven = spra.LeafMask.sparse((8, 6), jnp.asarray([0, 1, 2, 3], jnp.int32))  # all in the first rows
  with pytest.raises(ValueError, match=r"cannot be laid out for the grid \(2, 1\).* 0 to 4 per block"):
    layout.relayout_leaf(uneven, (2, 1))
  np.testing.assert_array_equal(layout.block_counts(uneven, (1, 2)), [3, 1])
