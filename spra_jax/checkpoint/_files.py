"""File-system helpers shared by the checkpoint modules: absolute paths, flushed JSON, atomic publishing.

Every writer of a file or directory that readers may see (adapters, merged exports, interop files) writes into a
hidden sibling and publishes it with :func:`publish` (through :func:`atomic_output`), so a reader sees the old or the
new contents, never a mix, and an interrupted write never touches the previous ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
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


def _renameat2(a: Path, b: Path, flags: int) -> int | None:
  """Linux ``renameat2``: 0 on success, the errno on failure, None where the C library or file system lacks it."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError, TypeError):
    return None
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
    return 0
  err = ctypes.get_errno()
  return None if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP) else err


def _exists_error(final: Path) -> FileExistsError:
  return FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")


def publish(tmp: Path, final: Path, *, overwrite: bool) -> None:
  """Moves the finished file or directory ``tmp`` to ``final`` so that readers see the old or the new one, never a mix.

  ``tmp`` must be on the file system of ``final`` (a :func:`temporary_sibling`
  or :func:`temporary_file`), so that every step is a rename.

  * A file is renamed over ``final`` (``os.replace``, atomic on POSIX); without
    ``overwrite`` it is hard-linked into place instead, which fails if
    ``final`` appeared meanwhile, so a concurrent writer is never clobbered.
  * A directory that is new is a single rename (``RENAME_NOREPLACE`` where the
    kernel offers it, for the same reason). An existing one (``overwrite=True``)
    is swapped atomically where the kernel offers ``renameat2(RENAME_EXCHANGE)``
    (Linux); elsewhere the old directory is first renamed to a hidden
    ``.<name>.replaced-*`` sibling, which survives a crash between the two
    renames and is removed after.

  Raises:
    FileExistsError: ``final`` exists and ``overwrite`` is False (``tmp`` is left for the caller to remove).
  """
  if final.exists() and not overwrite:
    raise _exists_error(final)
  if not tmp.is_dir():
    if overwrite:
      os.replace(tmp, final)
    else:
      try:
        os.link(tmp, final)
      except FileExistsError:
        raise _exists_error(final) from None
      except OSError:  # a file system without hard links: the check above is the best it allows
        os.replace(tmp, final)
      else:
        os.unlink(tmp)
  elif not final.exists():
    rc = _renameat2(tmp, final, _RENAME_NOREPLACE)
    if rc is None:
      os.rename(tmp, final)
    elif rc in (errno.EEXIST, errno.ENOTEMPTY):  # another writer published it meanwhile
      if not overwrite:
        raise _exists_error(final)
      publish(tmp, final, overwrite=True)
      return
    elif rc:
      raise OSError(rc, os.strerror(rc), str(final))
  elif _renameat2(tmp, final, _RENAME_EXCHANGE) == 0:
    shutil.rmtree(tmp)  # now holds the previous contents
  else:
    backup = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:12]}"
    os.rename(final, backup)
    os.rename(tmp, final)
    shutil.rmtree(backup)
  fsync_path(final.parent)


def temporary_file(final: Path, tag: str) -> Path:
  """A fresh, not yet existing hidden file name next to ``final`` (same file system, so renames are atomic)."""
  final.parent.mkdir(parents=True, exist_ok=True)
  return final.parent / f".{final.name}.{tag}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_output(final: Path, *, overwrite: bool, directory: bool = True) -> Iterator[Path]:
  """Yields a hidden temporary sibling of ``final`` to write into; publishes it when the block succeeds.

  With ``directory=True`` the sibling is an (empty) directory
  ``.<name>.tmp-*``; with ``directory=False`` it is a file name that the block
  creates. When the block raises (a ``KeyboardInterrupt`` included) the sibling
  is removed and ``final`` is untouched; only a killed process leaves it behind
  (see :func:`leftovers`).

  IMPORTANT: whatever the block writes must be complete when it ends (wait for
  asynchronous writers, e.g. Orbax's ``wait_until_finished``; :func:`write_json`
  also flushes to disk): the rename publishes what is there, nothing more.

  Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> final = Path(tempfile.mkdtemp()) / 'out'
    >>> with atomic_output(final, overwrite=False) as tmp:
    ...   write_json(tmp / 'a.json', {'x': 1})
    >>> sorted(p.name for p in final.iterdir()), leftovers(final)
    (['a.json'], [])
    >>> with atomic_output(final / 'a.json', overwrite=True, directory=False) as tmp:
    ...   write_json(tmp, {'x': 2})
    >>> (final / 'a.json').read_text().split()
    ['{', '"x":', '2', '}']
  """
  tmp = temporary_sibling(final, "tmp") if directory else temporary_file(final, "tmp")
  try:
    yield tmp
    fsync_path(tmp)
    publish(tmp, final, overwrite=overwrite)
  except BaseException:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      tmp.unlink(missing_ok=True)
    raise


def leftovers(final: Path) -> list[Path]:
  """Hidden siblings that an interrupted save or replace left next to ``final``."""
  if not final.parent.is_dir():
    return []
  prefix = f".{final.name}."
  return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))
