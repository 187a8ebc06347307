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
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spra_jax import _host

_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def absolute(directory: str | os.PathLike) -> Path:
  """``directory`` as an absolute path (Orbax refuses relative ones)."""
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}.")
  return Path(os.path.abspath(os.fspath(directory)))


# A staging sibling's name says who owns it, ``.<name>.tmp-<host>-<pid>-<random>``, so that a later save can tell the
# staging directory of a killed save (its process is gone) from that of a save still running in another process.
# <host> is a short hash of the host name: on a file system shared by several machines a pid means nothing on another
# host, so only this host's entries are judged by their pid.
_STAGING_TAG = "tmp"
# Staging siblings whose owner cannot be checked (another host's, or those of versions before the owner was named) are
# removed once they are this old: no adapter save runs for a day.
STALE_AFTER_S = 24 * 3600


def _host_tag() -> str:
  return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _staging_name(final: Path, tag: str) -> str:
  return f".{final.name}.{tag}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def temporary_sibling(final: Path, tag: str) -> Path:
  """A fresh hidden directory next to ``final`` (same file system, so renames are atomic), named by its owner."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / _staging_name(final, tag)
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
  return final.parent / _staging_name(final, tag)


def _pid_alive(pid: int) -> bool:
  """Whether a process ``pid`` exists on this host (one of another user counts: it may be saving)."""
  if pid <= 0:
    return True  # not a pid this module writes; never judged dead
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, OSError):
    return True
  return True


def _stale(entry: Path, final: Path) -> bool:
  """Whether ``entry`` is the staging sibling of ``final`` of a save that can no longer finish."""
  name = re.escape(final.name)
  owned = re.fullmatch(rf"\.{name}\.{_STAGING_TAG}-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{12}}", entry.name)
  if owned and owned.group(1) == _host_tag():
    # A pid that was reused since keeps its entry until that process is gone too: the safe side.
    return not _pid_alive(int(owned.group(2)))
  if owned or re.fullmatch(rf"\.{name}\.{_STAGING_TAG}-[0-9a-f]{{12}}", entry.name):
    try:
      return time.time() - entry.lstat().st_mtime > STALE_AFTER_S
    except OSError:
      return False
  return False


def remove_stale_staging(final: Path) -> list[Path]:
  """Removes the staging siblings of ``final`` that killed saves left behind; returns what it removed.

  An entry is stale when it names this host and a process that no longer
  exists (the staging names carry both, see :func:`temporary_sibling`); one of
  another host, or of an older unnamed kind, only when it is older than
  :data:`STALE_AFTER_S`. A save still running in a live process keeps its
  entry. ``.<name>.replaced-*`` siblings are never touched: after a crash in
  the middle of a replace they may hold the only complete copy.

  Example:

    >>> import tempfile
    >>> final = Path(tempfile.mkdtemp()) / 'out'
    >>> (final.parent / '.out.tmp-00000000-1-000000000000').mkdir()  # a foreign host's, fresh: kept
    >>> remove_stale_staging(final), len(leftovers(final))
    ([], 1)
  """
  if not final.parent.is_dir():
    return []
  removed = []
  for entry in leftovers(final):
    if _stale(entry, final):
      if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          entry.unlink()
      removed.append(entry)
  return removed


@contextlib.contextmanager
def atomic_output(final: Path, *, overwrite: bool, directory: bool = True) -> Iterator[Path]:
  """Yields a hidden temporary sibling of ``final`` to write into; publishes it when the block succeeds.

  With ``directory=True`` the sibling is an (empty) directory
  ``.<name>.tmp-*``; with ``directory=False`` it is a file name that the block
  creates. When the block raises (a ``KeyboardInterrupt`` included) the sibling
  is removed and ``final`` is untouched; only a killed process leaves it behind
  (see :func:`leftovers`), and the next ``atomic_output`` to the same ``final``
  removes it (see :func:`remove_stale_staging`).

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
  remove_stale_staging(final)
  tmp = temporary_sibling(final, _STAGING_TAG) if directory else temporary_file(final, _STAGING_TAG)
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


@contextlib.contextmanager
def shared_output(final: Path, *, overwrite: bool, what: str) -> Iterator[Path | None]:
  """:func:`atomic_output` of a directory for code that every process of a cluster runs (one process: the same).

  Every process enters the block (it may run collectives, e.g. gathering arrays to the host); process 0 gets the
  temporary directory to write into, the others ``None`` (they write nothing). ``final`` is checked by every
  process before any writes; it is published only when the block succeeded on every process, and every process
  then returns, or raises, alike: an error of process 0's write is raised on all, never a half-written directory.

  Raises:
    FileExistsError: ``final`` exists and ``overwrite`` is False (on every process, before anything is written).
    OSError: another process failed (its own error says why); nothing was published.
  """
  if not _host.multiprocess():
    if final.exists() and not overwrite:
      raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")
    with atomic_output(final, overwrite=overwrite) as tmp:
      yield tmp
    return
  if not _host.all_agree(overwrite or not final.exists()):
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")
  _host.barrier(f"spra_jax {what} checked {final}")  # every process looked before process 0 writes
  error: BaseException | None = None
  output = tmp = None
  if _host.is_primary():
    try:
      output = atomic_output(final, overwrite=overwrite)
      tmp = output.__enter__()
    except BaseException as e:  # noqa: BLE001  (raised below, once the other processes know)
      error, output = e, None
  try:
    yield tmp if error is None else None
  except BaseException as e:  # noqa: BLE001
    error = error or e
  everyone = _host.all_agree(error is None)
  if output is not None:
    if everyone:
      try:
        output.__exit__(None, None, None)  # publishes
      except BaseException as e:  # noqa: BLE001
        error = e
    else:
      failure = error or OSError(f"another process failed while writing {final}")
      with contextlib.suppress(BaseException):
        output.__exit__(type(failure), failure, failure.__traceback__)  # removes the temporary directory
  published = bool(_host.broadcast_from_primary(np.int32(everyone and error is None)))
  if error is not None:
    raise error
  if not published:
    raise OSError(f"{what}: another process failed to write {final} (its error says why); nothing was published.")


def on_primary(write: Callable[[], None], *, what: str) -> None:
  """Runs ``write()`` on process 0 only (everywhere on one process); every process returns, or raises, alike.

  For files that are published one by one (each atomically) rather than as one directory.

  Raises:
    OSError: on the other processes, when process 0's ``write`` failed (process 0 raises its own error).
  """
  if not _host.multiprocess():
    write()
    return
  error: BaseException | None = None
  if _host.is_primary():
    try:
      write()
    except BaseException as e:  # noqa: BLE001  (raised below, once the other processes know)
      error = e
  ok = bool(_host.broadcast_from_primary(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise OSError(f"{what}: process 0 failed to write (its error says why).")
