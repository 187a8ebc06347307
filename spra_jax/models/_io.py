"""Lazy tensor sources: read one checkpoint tensor at a time.

A *tensor source* is a ``Mapping[str, LazyTensor]`` keyed by the Hugging Face
torch names (``encoder.layer.0.attention.self.query.weight``), in torch layout
(``[out, in]`` for Linear weights). A :class:`LazyTensor` knows its shape and
dtype from the file header and reads its bytes only when called, so loading a
model holds at most one tensor beyond the model itself. The reader parses the
safetensors header itself and reads each tensor with one ``readinto`` into an
aligned buffer (no memory map whose pages would count against the process).

:func:`open_safetensors` opens a ``model.safetensors`` file, a directory that
holds one, or a sharded checkpoint (``model.safetensors.index.json`` plus its
shards). bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.

Example:

  >>> import os, tempfile
  >>> import numpy as np
  >>> from safetensors.numpy import save_file
  >>> from spra_jax.models._io import open_safetensors
  >>> folder = tempfile.mkdtemp()
  >>> save_file({'dense.weight': np.ones((3, 2), np.float32)}, os.path.join(folder, 'model.safetensors'))
  >>> tensors = open_safetensors(folder)
  >>> t = tensors['dense.weight']
  >>> t.shape, t.dtype, float(t().sum())
  ((3, 2), dtype('float32'), 6.0)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import ml_dtypes
import numpy as np

# One mapping for loading, export and interop; re-exported here for the model families.
from spra_jax._torch_names import to_torch_layout, torch_name

__all__ = ["LazyTensor", "SafetensorsTensor", "SafetensorsSource", "aligned_empty", "load_params", "open_safetensors",
           "torch_name", "to_torch_layout"]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_ALIGN = 64

# safetensors' dtype codes -> numpy dtypes (numpy has no bfloat16 or float8: ml_dtypes provides them).
_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


@runtime_checkable
class LazyTensor(Protocol):
  """One checkpoint tensor that is read (or dequantised) only when called.

  Any object with ``shape`` (a tuple of ints), ``dtype`` (a numpy dtype) and
  ``__call__() -> np.ndarray`` fits; the array is in torch layout.
  """

  @property
  def shape(self) -> tuple[int, ...]: ...

  @property
  def dtype(self) -> np.dtype: ...

  def __call__(self) -> np.ndarray: ...


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.

  ``jax.device_put`` on CPU can adopt such a buffer without copying it, so a
  tensor read into one is never held twice.

  Example:

    >>> a = aligned_empty((3, 5), np.float32)
    >>> a.shape, a.ctypes.data % 64, a.flags['C_CONTIGUOUS']
    ((3, 5), 0, True)
  """
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = (-raw.ctypes.data) % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class SafetensorsTensor:
  """A tensor of a ``.safetensors`` file, read on each call.

  Each call opens the file, reads exactly this tensor's bytes into a fresh
  64-byte-aligned array and closes the file. Nothing is memory-mapped, so the
  process never holds the file's pages beside the copy.

  Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), 'model.safetensors')
    >>> save_file({'w': np.arange(4, dtype=np.int64)}, path)
    >>> t = open_safetensors(path)['w']
    >>> t().tolist(), t.shape, t.dtype
    ([0, 1, 2, 3], (4,), dtype('int64'))
  """

  __slots__ = ("path", "name", "shape", "dtype", "offset")

  def __init__(self, path: str | os.PathLike, name: str, shape: tuple[int, ...], dtype: np.dtype, offset: int):
    self.path = str(path)
    self.name = name
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self.offset = int(offset)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def __call__(self) -> np.ndarray:
    out = aligned_empty(self.shape, self.dtype)
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != self.nbytes:
      raise ValueError(f"{self.path}: tensor {self.name!r} is truncated ({got} of {self.nbytes} bytes).")
    return out

  def __repr__(self) -> str:
    return f"SafetensorsTensor({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class SafetensorsSource(Mapping):
  """A read-only mapping from tensor names to :class:`SafetensorsTensor`.

  Only the headers are read when it is built. ``files`` lists the shard paths.

  Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), 'model.safetensors')
    >>> save_file({'a': np.zeros(2, np.float32), 'b': np.zeros(3, np.float32)}, path)
    >>> source = open_safetensors(path)
    >>> sorted(source), len(source.files)
    (['a', 'b'], 1)
  """

  def __init__(self, tensors: dict[str, SafetensorsTensor], files: list[str]):
    self._tensors = tensors
    self.files = files

  def __getitem__(self, name: str) -> SafetensorsTensor:
    return self._tensors[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  @property
  def nbytes(self) -> int:
    """Total bytes of the tensors (as stored)."""
    return sum(t.dtype.itemsize * int(np.prod(t.shape)) for t in self._tensors.values())

  def __repr__(self) -> str:
    return f"SafetensorsSource({len(self)} tensors in {len(self.files)} file(s))"


def _read_header(path: Path) -> dict[str, SafetensorsTensor]:
  # The format: an 8-byte little-endian header length, a JSON header
  # {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= length <= size - 8:
      raise ValueError(f"{path} is not a safetensors file (bad header length).")
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise ValueError(f"{path} is not a safetensors file (its header is not JSON).") from err
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object).")
  data_start = 8 + length
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: the header entry of {name!r} is malformed: {info!r}.") from err
    if code not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which this reader does not support "
                       f"(supported: {', '.join(_DTYPES)}).")
    tensor = SafetensorsTensor(path, name, shape, _DTYPES[code], data_start + int(begin))
    if int(end) - int(begin) != tensor.nbytes or data_start + int(end) > size:
      raise ValueError(f"{path}: tensor {name!r} ({code}{list(shape)}) does not fit its byte range [{begin}, {end}).")
    out[name] = tensor
  return out


def _listing(folder: Path) -> str:
  names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  return ", ".join(names) if names else "nothing"


def open_safetensors(directory_or_file: str | os.PathLike) -> SafetensorsSource:
  """Opens a safetensors checkpoint lazily: headers now, tensors when called.

  Args:
    directory_or_file: a ``.safetensors`` file, a ``model.safetensors.index.json``
      file, or a directory holding ``model.safetensors`` or a sharded index
      (the index wins when both are present).

  Returns:
    A :class:`SafetensorsSource` mapping torch names to lazy tensors.

  Raises:
    FileNotFoundError: when no checkpoint is found; the message lists what the
      directory holds.
    ValueError: for an unreadable file or an index naming a missing shard.

  Example:

    >>> import json, os, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({'a': np.ones(2, np.float32)}, os.path.join(folder, 'model-00001-of-00002.safetensors'))
    >>> save_file({'b': np.ones(3, np.float32)}, os.path.join(folder, 'model-00002-of-00002.safetensors'))
    >>> index = {'weight_map': {'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}}
    >>> with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    ...   json.dump(index, f)
    >>> source = open_safetensors(folder)
    >>> {name: t.shape for name, t in source.items()}
    {'a': (2,), 'b': (3,)}
  """
  path = Path(directory_or_file).expanduser()
  if path.is_dir():
    if (path / SAFETENSORS_INDEX).is_file():
      path = path / SAFETENSORS_INDEX
    elif (path / SAFETENSORS_FILE).is_file():
      path = path / SAFETENSORS_FILE
    else:
      shards = sorted(path.glob("*.safetensors"))
      if len(shards) != 1:
        hint = ""
        if shards:
          hint = f" (and {len(shards)} other .safetensors files, ambiguous without an index)"
        elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
          hint = " (PyTorch pickles such as pytorch_model.bin are not read: save the model with safetensors)"
        raise FileNotFoundError(
            f"{path} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}; it holds: {_listing(path)}."
        )
      path = shards[0]
  elif not path.is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path} (its folder holds: {_listing(path.parent)}).")

  if path.name.endswith(".json"):
    with open(path) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a safetensors index (expected a JSON object with 'weight_map').") from err
    tensors: dict[str, SafetensorsTensor] = {}
    files = sorted(set(weight_map.values()))
    for shard in files:
      shard_path = path.parent / shard
      if not shard_path.is_file():
        raise ValueError(
            f"{path} names the shard {shard!r}, which is missing; the folder holds: {_listing(path.parent)}."
        )
      header = _read_header(shard_path)
      wanted = [name for name, file in weight_map.items() if file == shard]
      absent = [name for name in wanted if name not in header]
      if absent:
        raise ValueError(f"{path} places {absent[:5]} in {shard!r}, which does not hold them.")
      tensors.update({name: header[name] for name in wanted})
    return SafetensorsSource(tensors, [str(path.parent / s) for s in files])

  return SafetensorsSource(_read_header(path), [str(path)])


def load_params(
    params: list[tuple[str, Any]],
    tensors: Mapping[str, Any],
    *,
    torch_name: Callable[[str], str],
    candidates: Callable[[str], list[str]],
    optional: tuple[str, ...],
    strict: bool,
    is_buffer: Callable[[str], bool] = lambda name: False,
    hint: Callable[[list[str]], str] = lambda missing: "",
) -> list[str]:
  """Copies checkpoint tensors into NNX variables, one tensor at a time (the architectures' ``load_weights``).

  ``params`` are ``(path, nnx.Variable)`` pairs, concrete or abstract. Every
  shape is checked before anything is read; then each tensor is read (lazy
  tensors are called), laid out ([out, in] -> [in, out] for ``.../kernel``),
  cast into an aligned buffer and set, largest first, so host memory holds at
  most one tensor beyond the model. A variable keeps the sharding it carries.

  Args:
    params: ``(path, variable)`` pairs of the model.
    tensors: HF torch names -> lazy tensors or arrays.
    torch_name: our path -> the torch name; ``candidates`` lists the names
      a tensor may have in a checkpoint (prefixes, legacy names).
    optional: path prefixes that may be missing (new heads).
    strict: raise when a parameter outside ``optional`` has no tensor.
    is_buffer: names of non-parameter tensors, left out of error listings.
    hint: extra words for the missing-tensor error, given the missing paths.

  Returns:
    The sorted paths of the parameters that found no tensor.

  Raises:
    ValueError: a tensor whose shape does not fit (naming it, its shape and the
      expected one), or missing tensors when ``strict``.
  """
  plan, missing = [], []
  for path, var in params:
    found = next((n for n in candidates(torch_name(path)) if n in tensors), None)
    if found is None:
      missing.append(path)
      continue
    tensor = tensors[found]
    expected = tuple(reversed(var.shape)) if path.endswith("/kernel") else tuple(var.shape)
    if tuple(tensor.shape) != expected:
      raise ValueError(
          f"checkpoint tensor {found!r} has shape {tuple(tensor.shape)}, but the model expects {expected} "
          f"(for {path!r}); is the config right for this checkpoint?"
      )
    plan.append((path, var, tensor))

  unexpected = [p for p in missing if not p.startswith(optional)]
  if strict and unexpected:
    known = [n for n in tensors if not is_buffer(n)]
    raise ValueError(
        f"{len(unexpected)} parameter(s) have no tensor in the checkpoint: "
        f"{[torch_name(p) for p in unexpected[:12]]}{' …' if len(unexpected) > 12 else ''}{hint(unexpected)}; "
        f"the checkpoint holds {len(known)} tensors such as {known[:6]}. Pass strict=False to keep them at init."
    )

  plan.sort(key=lambda item: -math.prod(item[1].shape))
  for path, var, tensor in plan:
    array = tensor() if callable(tensor) else np.asarray(tensor)
    if path.endswith("/kernel"):
      array = array.T
    if array.dtype != var.dtype or not array.flags.c_contiguous or array.ctypes.data % 64:
      # One host copy does layout and cast, into an aligned buffer that device_put can adopt
      # without another copy (on CPU), so no tensor exists three times.
      staged = aligned_empty(array.shape, var.dtype)
      np.copyto(staged, array, casting="unsafe")
      array = staged
    # Keep a sharding the (abstract) variable already carries, e.g. from nnx.eval_shape under a mesh.
    var.set_value(jax.device_put(array, getattr(var.get_value(), "sharding", None)))
    del array
  return sorted(missing)
