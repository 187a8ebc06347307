"""Counting and printing a mask: the number of trainable entries, per-leaf rows, a readable table."""

from __future__ import annotations

from typing import Any

from spra_jax.masks.leaf import FROZEN, _leaf_masks_with_paths

__all__ = ["num_trainable", "summary", "summary_rows"]


def num_trainable(mask: Any) -> int:
  """Total number of trainable entries of a mask.

  Example:

    >>> from spra_jax.masks import LeafMask
    >>> num_trainable({'a': LeafMask.full((3, 4)), 'b': LeafMask.frozen((5,))})
    12
  """
  return sum(m.num_trainable for _, m in _leaf_masks_with_paths(mask))


def summary_rows(mask: Any) -> list[dict[str, Any]]:
  """Per-leaf rows: path, shape, kind, trainable count and density.

  Example:

    >>> from spra_jax.masks import LeafMask
    >>> summary_rows({'w': LeafMask.full((2, 2))})[0]['trainable']
    4
  """
  return [
      {"path": p, "shape": m.shape, "kind": m.kind, "size": m.size, "trainable": m.num_trainable, "density": m.density}
      for p, m in _leaf_masks_with_paths(mask)
  ]


def summary(mask: Any, *, show_frozen: bool = True) -> str:
  """A readable per-leaf table of a mask, with totals.

  Example:

    >>> from spra_jax.masks import LeafMask
    >>> print(summary({'head': LeafMask.full((4, 2)), 'emb': LeafMask.frozen((10, 4))}))
    path  shape    kind    trainable  density
    ----  -------  ------  ---------  --------
    emb   (10, 4)  frozen          0  0.000%
    head  (4, 2)   full            8  100.000%
    total 48 entries, 8 trainable (16.667%)
  """
  rows = summary_rows(mask)
  total = sum(r["size"] for r in rows)
  trained = sum(r["trainable"] for r in rows)
  shown = [r for r in rows if show_frozen or r["kind"] != FROZEN]
  table = [("path", "shape", "kind", "trainable", "density")]
  table += [(r["path"], str(r["shape"]), r["kind"], f"{r['trainable']:,}", f"{100 * r['density']:.3f}%") for r in shown]
  widths = [max(len(row[c]) for row in table) for c in range(5)]
  lines = []
  for j, row in enumerate(table):
    cells = [row[c].rjust(widths[c]) if c == 3 else row[c].ljust(widths[c]) for c in range(5)]
    lines.append("  ".join(cells).rstrip())
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  pct = 100 * trained / total if total else 0.0
  lines.append(f"total {total:,} entries, {trained:,} trainable ({pct:.3f}%)")
  return "\n".join(lines)
