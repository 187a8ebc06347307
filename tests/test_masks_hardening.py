"""Mask sampling under bad or edge-case input: leaves that get no entry, min_per_leaf, bad regexes, out-of-range
seeds, unknown distribution names."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spra_jax as spra
from spra_jax import masks
from spra_jax.masks import sampling

SMALL_LEAF_WARNING = (
    r"sample_mask: 1 of the 2 sparse leaves gets no trainable entry at Uniform\(0.01\) and stays frozen: "
    r"'b' \(3 entries\)\. To train every leaf, pass min_per_leaf=1 \(also spra.masked\(\.\.\., min_per_leaf=1\)\) "
    r"or a higher density\."
)


def wb():
  return {"w": jnp.zeros((64, 64)), "b": jnp.zeros(3)}


def assert_sorted_unique_in_range(m):
  idx = np.asarray(m.indices)
  assert idx.dtype == np.int32 and idx.size and idx[0] >= 0 and idx[-1] < m.size
  assert np.all(np.diff(idx) > 0)


# ------------------------------------------------------------- leaves that get no entry


def test_a_leaf_whose_budget_rounds_to_zero_is_frozen_with_a_warning_naming_it():
  with pytest.warns(UserWarning, match=SMALL_LEAF_WARNING):
    mask = spra.sample_mask(0, wb(), density=0.01)
  assert mask["b"].kind == masks.FROZEN and mask["b"].indices is None
  assert mask["w"].kind == masks.SPARSE and mask["w"].num_trainable == 41
  # The same through spra.masked: the frozen leaf has no compact state at all (no zero-size arrays).
  with pytest.warns(UserWarning, match=SMALL_LEAF_WARNING):
    state = spra.masked(optax.adam(1e-2), density=0.01, key=0).init(wb())
  assert spra.mask_of(state)["b"].kind == masks.FROZEN
  assert all(x.size for x in jax.tree.leaves(state.inner_state))


def test_a_leaf_with_no_entries_is_frozen_without_a_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mask = spra.sample_mask(0, {"w": jnp.zeros((10, 10)), "e": jnp.zeros((0, 4))}, density=0.5, min_per_leaf=1)
  assert mask["e"].kind == masks.FROZEN and mask["w"].num_trainable == 50


def test_a_random_count_that_comes_out_zero_is_frozen_with_a_warning():
  # bernoulli(0.01) over 10 entries draws nothing with odds 0.9; seed 0 does.
  params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(10)}
  with pytest.warns(UserWarning, match=r"the only sparse leaf gets no trainable entry .*'b' \(10 entries\)"):
    mask = spra.sample_mask(0, params, masks.bernoulli(0.01), full="w")
  assert mask["b"].kind == masks.FROZEN


# ------------------------------------------------------------- min_per_leaf


def test_min_per_leaf_gives_the_small_leaf_its_minimum_and_leaves_the_others_unchanged():
  with pytest.warns(UserWarning):
    plain = spra.sample_mask(0, wb(), density=0.01)
  one = spra.sample_mask(0, wb(), density=0.01, min_per_leaf=1)
  assert one["b"].kind == masks.SPARSE and one["b"].num_trainable == 1
  np.testing.assert_array_equal(one["w"].indices, plain["w"].indices)
  # At most the leaf's size; and a minimum below a leaf's budget changes nothing.
  five = spra.sample_mask(0, wb(), density=0.01, min_per_leaf=5)
  assert five["b"].num_trainable == 3 and five["w"].num_trainable == 41
  np.testing.assert_array_equal(five["w"].indices, plain["w"].indices)
  big = spra.sample_mask(0, wb(), density=0.01, min_per_leaf=100)
  assert big["w"].num_trainable == 100 and big["b"].num_trainable == 3
  assert_sorted_unique_in_range(big["w"])


def test_min_per_leaf_with_other_allocation_rules():
  params = {"a": jnp.zeros(100), "b": jnp.zeros(100)}
  first_only = lambda paths, sizes, total: [total if p == "a" else 0 for p in paths]
  m = spra.sample_mask(0, params, masks.uniform(0.05, allocation=first_only), min_per_leaf=2)
  assert [m[k].num_trainable for k in "ab"] == [10, 2]
  m = spra.sample_mask(0, params, masks.uniform(0.001, relative_to="model"), min_per_leaf=2)
  assert [m[k].num_trainable for k in "ab"] == [2, 2]  # above the model's budget of 0: the minimum wins


@pytest.mark.parametrize("dist, line", [(masks.rows(0.001), 16), (masks.columns(0.001), 8)])
def test_min_per_leaf_with_rows_and_columns_means_whole_lines(dist, line):
  params = {"w": jnp.zeros((64, 64)), "v": jnp.zeros((8, 16))}  # v's budget rounds to 0 at 0.001
  with pytest.warns(UserWarning, match=r"'v' \(128 entries\)"):
    assert spra.sample_mask(0, params, dist, full="w")["v"].kind == masks.FROZEN
  for minimum, lines in ((1, 1), (line, 1), (line + 1, 2)):
    v = spra.sample_mask(0, params, dist, full="w", min_per_leaf=minimum)["v"]
    assert v.num_trainable == lines * line
    idx = np.asarray(v.indices)
    chosen = np.unique(idx // 16) if dist.name == "rows" else np.unique(idx % 16)
    assert len(chosen) == lines  # whole rows (columns), no stray entries


def test_min_per_leaf_with_clipped_tiles_counts_the_smallest_tile():
  params = {"w": jnp.zeros((12, 12))}  # 8x8 tiles: a 4x4 corner tile
  for seed in range(5):
    m = spra.sample_mask(seed, params, masks.blocks(0.001, block=(8, 8)), min_per_leaf=20)["w"]
    assert m.num_trainable >= 20
    assert_sorted_unique_in_range(m)


def test_min_per_leaf_tops_up_a_short_random_count():
  # The minimum raises b's budget (its expected count) from 0 to 2, as bernoulli(0.2) has it; a draw below 2 is
  # topped up with other entries of b. Seeds 2, 7 and 6 draw 0, 1 and 2 entries at bernoulli(0.2).
  params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(10)}
  for seed, drawn in ((2, 0), (7, 1), (6, 2)):
    with pytest.warns(UserWarning) if drawn == 0 else warnings.catch_warnings():
      raw = spra.sample_mask(seed, params, masks.bernoulli(0.2), full="w")["b"]
    raised = spra.sample_mask(seed, params, masks.bernoulli(0.01), full="w", min_per_leaf=2)["b"]
    assert raw.num_trainable == drawn and raised.num_trainable == 2
    assert_sorted_unique_in_range(raised)
    if drawn:
      assert set(np.asarray(raw.indices).tolist()) <= set(np.asarray(raised.indices).tolist())


class _Split8:
  """A stand-in for a sharding that splits the first axis over 8 devices (block_grid reads only shard_shape)."""

  def shard_shape(self, shape):
    return (shape[0] // 8, *shape[1:])


def test_min_per_leaf_on_a_shard_local_leaf_reaches_it_in_every_block(monkeypatch):
  # Only w, 8 blocks of 4 entries, is "sharded"; it is too small for an entry at 0.01.
  monkeypatch.setattr(sampling, "leaf_sharding", lambda leaf: _Split8() if leaf.shape == (8, 4) else None)
  params = {"w": jnp.zeros((8, 4)), "v": jnp.zeros((64, 64))}
  with pytest.warns(UserWarning, match=r"1 of the 2 sparse leaves gets no trainable entry .*'w' \(32 entries\)"):
    assert spra.sample_mask(0, params, density=0.01)["w"].kind == masks.FROZEN
  for minimum, per_block in ((1, 1), (10, 2), (32, 4)):  # 10 rounds to 1 per block (8 < 10): 2 per block
    m = spra.sample_mask(0, params, density=0.01, min_per_leaf=minimum)["w"]
    assert m.blocks == (8, 1) and m.num_trainable == 8 * per_block >= minimum
    idx = np.asarray(m.indices).reshape(8, per_block)
    assert np.all(idx // 4 == np.arange(8)[:, None])  # slice j lies in block j
  # Without a raised budget the blocked mask is the one sampled without the minimum.
  only_w = {"w": params["w"]}
  np.testing.assert_array_equal(spra.sample_mask(0, only_w, density=0.1)["w"].indices,
                                spra.sample_mask(0, only_w, density=0.1, min_per_leaf=1)["w"].indices)


def test_masked_with_min_per_leaf_trains_the_small_leaf():
  params = wb()
  tx = spra.masked(optax.adam(1e-2), density=0.01, key=0, min_per_leaf=1)
  state = tx.init(params)
  assert spra.mask_of(state)["b"].num_trainable == 1
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(jnp.sum(updates["b"] != 0)) == 1 and int(jnp.sum(updates["w"] != 0)) == 41


@pytest.mark.parametrize("value, error, message", [
    (-1, ValueError, r"min_per_leaf must be a non-negative int, got -1\."),
    (1.5, TypeError, r"min_per_leaf must be a non-negative int, got 1\.5 \(float\)\."),
    (True, TypeError, r"min_per_leaf must be a non-negative int, got True \(bool\)\."),
])
def test_min_per_leaf_is_validated(value, error, message):
  with pytest.raises(error, match=message):
    spra.sample_mask(0, wb(), density=0.5, min_per_leaf=value)


# ------------------------------------------------------------- bad regexes, seeds, names


@pytest.mark.parametrize("argument", ["include", "exclude", "full"])
def test_a_bad_regex_names_the_argument_and_the_pattern(argument):
  expected = rf"^{argument}='\(' is not a valid regular expression: missing \), unterminated subpattern at position 0$"
  with pytest.raises(ValueError, match=expected):
    spra.sample_mask(0, wb(), density=0.5, **{argument: "("})
  with pytest.raises(ValueError, match=rf"^{argument}\[1\]='\[' is not a valid regular expression: "):
    masks.leaf_roles(wb(), **{argument: ["w", "["]})


def test_a_bad_regex_in_an_allocation_map_names_it():
  with pytest.raises(ValueError, match=r"allocation key '\(' is not a valid path regular expression: missing \)"):
    spra.sample_mask(0, wb(), masks.uniform(0.5, allocation={"(": 0.1}))


def test_an_int_seed_out_of_range_names_the_accepted_range():
  expected = (r"key=1180591620717411303424 is out of range for an int seed: jax.random.key takes "
              r"-2\*\*63 <= seed < 2\*\*63 .*seeds 0 <= seed < 2\*\*32 give distinct masks.*jax.random.key\(0\)")
  with pytest.raises(ValueError, match=expected):
    spra.sample_mask(2**70, wb(), density=0.5)
  with pytest.raises(ValueError, match="out of range for an int seed"):
    spra.sample_mask(-(2**63) - 1, wb(), density=0.5)
  assert spra.sample_mask(2**63 - 1, wb(), density=0.5)["w"].num_trainable == 2048  # the edge is accepted


def test_an_unknown_distribution_name_lists_the_available_ones():
  available = ", ".join(masks.available())
  expected = rf"^unknown mask distribution 'unifrom' \(did you mean 'uniform'\?\); available: {available}\.$"
  with pytest.raises(ValueError, match=expected):
    spra.sample_mask(0, wb(), "unifrom", density=0.1)
  with pytest.raises(ValueError, match=expected):
    masks.get("unifrom", 0.1)
  with pytest.raises(ValueError, match=expected):  # the name is checked before the missing density
    spra.sample_mask(0, wb(), "unifrom")
  with pytest.raises(ValueError, match=expected):  # at construction, not at init
    spra.masked(optax.sgd(0.1), key=0, distribution="unifrom")
  with pytest.raises(ValueError, match=rf"^unknown mask distribution 'gaussian'; available: {available}\.$"):
    masks.get("gaussian", 0.1)
  with pytest.raises(ValueError, match=r"'top-k' \(it needs data besides a density: pass spra.masks.top_k\("):
    masks.get("top-k", 0.1)
  with pytest.raises(ValueError, match=r"a density is needed with distribution='rows': pass density=\.\.\."):
    spra.sample_mask(0, wb(), "rows")


def test_masked_checks_min_per_leaf_when_built():
  mask = spra.sample_mask(0, {"w": jnp.zeros((8, 8))}, density=0.5)
  with pytest.raises(ValueError, match="got a mask and also min_per_leaf"):
    spra.masked(optax.adam(1e-2), mask, min_per_leaf=1)
  with pytest.raises(ValueError, match="min_per_leaf must be a non-negative int, got -1"):
    spra.masked(optax.adam(1e-2), density=0.1, key=0, min_per_leaf=-1)
