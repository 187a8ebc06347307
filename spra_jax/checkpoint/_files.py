"""File-system helpers shared by the checkpoint modules: absolute paths, atomic directory replacement."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def absolute(directory: str | os.PathLike) -> Path:
  """``directory`` as an absolute path (Orbax refuses relative ones)."""
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}.")
  return Path(os.path.abspath(os.fspath(directory)))


def temporary_sibling(final: Path, tag: str) -> Path:
  """A fresh hidden directory next to ``final`` (same file system, so renames are atomic)."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.{tag}-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  return tmp


def fsync_path(path: Path) -> None:
  """Flushes a file or directory entry to disk (best effort on file systems that refuse it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_json(path: Path, obj: Any) -> None:
  """Writes JSON and flushes it to disk."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
  """Atomically swaps two directory entries with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError, TypeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
  return rc == 0


def publish(tmp: Path, final: Path, *, overwrite: bool) -> None:
  """Moves the finished directory ``tmp`` to ``final`` so that readers see the old or the new one, never a mix.

  A new ``final`` is a single ``rename``. An existing one (``overwrite=True``)
  is swapped atomically where the kernel offers ``renameat2(RENAME_EXCHANGE)``
  (Linux); elsewhere the old directory is first renamed to a hidden
  ``.<name>.replaced-*`` sibling, which survives a crash between the two
  renames and is removed after.
  """
  if not final.exists():
    os.rename(tmp, final)
  elif not overwrite:
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")
  elif _exchange(tmp, final):
    shutil.rmtree(tmp)  # now holds the previous contents
  else:
    backup = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:12]}"
    os.rename(final, backup)
    os.rename(tmp, final)
    shutil.rmtree(backup)
  fsync_path(final.parent)


def leftovers(final: Path) -> list[Path]:
  """Hidden siblings that an interrupted save or replace left next to ``final``."""
  if not final.parent.is_dir():
    return []
  prefix = f".{final.name}."
  return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))
