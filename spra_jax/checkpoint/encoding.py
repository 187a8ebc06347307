"""Index encodings for stored adapters.

A sparse leaf's indices are sorted, unique int32 flat positions. Stored as they
are they cost 4 bytes each. Sorted indices are better stored as *gaps* (the
first index, then the differences), which are small: at density d the mean gap
is 1/d. :func:`encode_gaps` writes each leaf's gaps in 1 or 2 bytes (whichever
is smaller for that leaf) and moves the rare gap that does not fit to a uint32
*escape* list, marking its slot with the narrow type's largest value.

Example:

  >>> import numpy as np
  >>> idx = np.array([3, 10, 300, 301], np.int32)
  >>> enc = encode_gaps(idx)
  >>> enc.width, enc.gaps.tolist(), enc.escapes.tolist()
  (1, [3, 7, 255, 1], [290])
  >>> decode_gaps(enc.gaps, enc.escapes).tolist()
  [3, 10, 300, 301]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["WIDTH_DTYPES", "EncodedIndices", "decode_gaps", "encode_gaps"]

#: Narrow dtype per gap width in bytes (width 4 stores the gaps as uint32, no escapes).
WIDTH_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


class EncodedIndices(NamedTuple):
  """One leaf's indices as gaps.

  Attributes:
    width: bytes per gap (1, 2 or 4).
    gaps: the gaps in ``WIDTH_DTYPES[width]``; a slot holding the dtype's
      largest value (width 1 and 2) is an escape.
    escapes: uint32 values of the escaped gaps, in order.
  """

  width: int
  gaps: np.ndarray
  escapes: np.ndarray

  @property
  def nbytes(self) -> int:
    """Bytes of the gaps plus the escapes."""
    return int(self.gaps.nbytes + self.escapes.nbytes)


def _gaps(indices: np.ndarray) -> np.ndarray:
  idx = np.asarray(indices, np.int64)
  if idx.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {idx.shape}.")
  if idx.size and (idx[0] < 0 or np.any(np.diff(idx) <= 0)):
    raise ValueError("indices must be non-negative, sorted and unique to be gap-encoded.")
  return np.diff(idx, prepend=0)


def encode_gaps(indices: np.ndarray) -> EncodedIndices:
  """Encodes sorted unique non-negative indices as gaps of the cheapest width.

  Args:
    indices: a 1-D sorted, unique, non-negative integer vector (< 2**32).

  Returns:
    An :class:`EncodedIndices` whose :attr:`~EncodedIndices.nbytes` is the
    smallest of the three widths for this leaf.

  Example:

    >>> import numpy as np
    >>> encode_gaps(np.arange(0, 5000, 1000)).width   # gaps of 1000 need 2 bytes
    2
  """
  gaps = _gaps(indices)
  best = None
  for width, dtype in WIDTH_DTYPES.items():
    if width == 4:
      cost = 4 * gaps.size
    else:
      sentinel = np.iinfo(dtype).max
      cost = width * gaps.size + 4 * int(np.count_nonzero(gaps >= sentinel))
    if best is None or cost < best[0]:
      best = (cost, width)
  width = best[1]
  dtype = WIDTH_DTYPES[width]
  if width == 4:
    return EncodedIndices(4, gaps.astype(np.uint32), np.zeros((0,), np.uint32))
  sentinel = np.iinfo(dtype).max
  escaped = gaps >= sentinel
  narrow = np.where(escaped, sentinel, gaps).astype(dtype)
  return EncodedIndices(width, narrow, gaps[escaped].astype(np.uint32))


def decode_gaps(gaps: np.ndarray, escapes: np.ndarray) -> np.ndarray:
  """The int32 indices back from their gaps and escapes (see :func:`encode_gaps`).

  Raises:
    ValueError: if the escape count does not match the escaped slots.

  Example:

    >>> import numpy as np
    >>> decode_gaps(np.array([5, 1, 1], np.uint8), np.zeros(0, np.uint32)).tolist()
    [5, 6, 7]
  """
  gaps = np.asarray(gaps)
  wide = gaps.astype(np.int64)
  if gaps.dtype != np.uint32:
    escaped = gaps == np.iinfo(gaps.dtype).max
    if int(np.count_nonzero(escaped)) != len(escapes):
      raise ValueError(
          f"gap encoding is inconsistent: {int(np.count_nonzero(escaped))} escaped slots but {len(escapes)} escapes."
      )
    wide[escaped] = np.asarray(escapes, np.int64)
  elif len(escapes):
    raise ValueError("4-byte gaps carry no escapes.")
  out = np.cumsum(wide)
  if out.size and out[-1] > np.iinfo(np.int32).max:
    raise ValueError(f"decoded index {out[-1]} does not fit int32.")
  return out.astype(np.int32)
