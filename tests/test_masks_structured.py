"""Structured (rows, columns, blocks) and score-based (top-k, magnitude, Fisher) distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spra_jax as spra
from spra_jax import masks


def tree():
  k = jax.random.split(jax.random.key(3), 3)
  return {"a": {"kernel": jax.random.normal(k[0], (96, 40))}, "b": {"kernel": jax.random.normal(k[1], (30, 70))},
          "c": {"bias": jax.random.normal(k[2], (50,))}, "d": {"kernel": jax.random.normal(k[2], (6, 4, 10))}}


def as_sets(mask):
  return {p: set(np.asarray(m.indices).tolist()) for p, m in masks._leaf_masks_with_paths(mask)}


def check_sorted_unique(mask):
  for path, m in masks._leaf_masks_with_paths(mask):
    idx = np.asarray(m.indices)
    assert idx.dtype == np.int32 and (np.diff(idx) > 0).all(), path
    assert idx.size == 0 or (0 <= idx.min() and idx.max() < np.prod(m.shape)), path


def test_rows_are_whole_rows():
  mask = spra.sample_mask(0, tree(), masks.rows(0.05))
  check_sorted_unique(mask)
  for path, m in masks._leaf_masks_with_paths(mask):
    idx = np.asarray(m.indices)
    if len(m.shape) >= 2:
      row = int(np.prod(m.shape[1:]))
      chosen = np.unique(idx // row)
      assert idx.size == chosen.size * row, path  # every chosen row complete
      assert chosen.size == max(1, masks._round_half_up(0.05 * m.shape[0])), path
    else:
      assert idx.size == masks._round_half_up(0.05 * m.shape[0])  # vectors fall back to entries (half up)


def test_columns_are_whole_columns():
  mask = spra.sample_mask(0, tree(), "columns", density=0.05)
  check_sorted_unique(mask)
  a = mask["a"]["kernel"]
  cols = np.unique(np.asarray(a.indices) % 40)
  assert a.num_trainable == cols.size * 96 and cols.size == 2
  dense = np.asarray(spra.to_dense({"x": a})["x"])
  assert dense[:, cols].all() and dense.sum() == a.num_trainable


def test_blocks_are_aligned_tiles_including_clipped_edges():
  mask = spra.sample_mask(1, {"w": jnp.zeros((50, 37))}, masks.blocks(0.3, block=(16, 16)))
  check_sorted_unique(mask)
  dense = np.asarray(spra.to_dense(mask)["w"])
  for r0 in range(0, 50, 16):
    for c0 in range(0, 37, 16):
      tile = dense[r0:r0 + 16, c0:c0 + 16]
      assert tile.all() or not tile.any()  # a tile is taken whole or not at all
  tiles = sum(dense[r0:r0 + 16, c0:c0 + 16].any() for r0 in range(0, 50, 16) for c0 in range(0, 37, 16))
  assert tiles == round(0.3 * 50 * 37 / 256)
  assert masks.blocks(0.1, block=(4, 8)).spec()["block"] == [4, 8]
  with pytest.raises(ValueError, match="two positive ints"):
    masks.blocks(0.1, block=(0, 4))


def test_structured_masks_are_deterministic_and_leaf_independent():
  for dist in (masks.rows(0.05), masks.columns(0.05), masks.blocks(0.05, block=(8, 8))):
    first = as_sets(spra.sample_mask(7, tree(), dist))
    assert first == as_sets(spra.sample_mask(7, tree(), dist))
    smaller = {k: v for k, v in tree().items() if k != "b"}
    only = as_sets(spra.sample_mask(7, smaller, dist))
    assert all(only[p] == first[p] for p in only)  # removing a leaf changes no other leaf
    assert first != as_sets(spra.sample_mask(8, tree(), dist))


def test_top_k_and_magnitude_pick_extremes_exactly():
  params = tree()
  largest = spra.sample_mask(0, params, masks.magnitude(0.1, params))
  smallest = spra.sample_mask(0, params, masks.magnitude(0.1, params, largest=False))
  for path, m in masks._leaf_masks_with_paths(largest):
    leaf = np.abs(np.asarray(params[path.split("/")[0]][path.split("/")[1]])).ravel()
    k = round(0.1 * leaf.size)
    assert m.num_trainable == k
    assert set(np.asarray(m.indices).tolist()) == set(np.argsort(-leaf, kind="stable")[:k].tolist())
    small = dict(masks._leaf_masks_with_paths(smallest))[path]
    assert set(np.asarray(small.indices).tolist()) == set(np.argsort(leaf, kind="stable")[:k].tolist())


def test_top_k_errors_name_the_leaf():
  params = tree()
  with pytest.raises(ValueError, match=r"no leaf 'b/kernel'"):
    spra.sample_mask(0, params, masks.top_k(0.1, {"a": {"kernel": params["a"]["kernel"]}}), include="^(a|b)/")
  bad = jax.tree.map(jnp.abs, params) | {"a": {"kernel": jnp.zeros((40, 96))}}
  with pytest.raises(ValueError, match=r"'a/kernel' have shape \(40, 96\), expected .*\(96, 40\)"):
    spra.sample_mask(0, params, masks.top_k(0.1, bad))


def test_fisher_scores_are_summed_squared_gradients_and_rank_the_mask():
  params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] - y) ** 2)

  rng = np.random.default_rng(0)
  data = [(jnp.asarray(rng.normal(size=(8, 4)) * [1, 0, 3, 0.1], jnp.float32), jnp.zeros(8)) for _ in range(3)]
  scores = masks.fisher_scores(loss, params, data)
  expected = sum(np.asarray(jax.grad(loss)(params, x, y)["w"]) ** 2 for x, y in data)
  np.testing.assert_allclose(np.asarray(scores["w"]), expected, rtol=1e-5)
  mask = spra.sample_mask(0, params, masks.top_k(0.5, scores))
  assert np.asarray(mask["w"].indices).tolist() == sorted(np.argsort(-expected)[:2].tolist())
  with pytest.raises(ValueError, match="at least one batch"):
    masks.fisher_scores(loss, params, [])


def test_fisher_scores_compile_once_per_loss_function_across_calls():
  traces = []

  def loss(p, x):
    traces.append(1)  # runs only while JAX traces
    return jnp.sum(p["w"] * x) ** 2

  params = {"w": jnp.ones(3)}
  for scale in (1.0, 2.0, 3.0):  # three runs of a sweep, each with its own scores
    scores = masks.fisher_scores(loss, params, [(jnp.array([scale, 0.0, 0.0]),)])
    assert float(scores["w"][0]) == pytest.approx((2 * scale * scale) ** 2)
  assert len(traces) == 1
