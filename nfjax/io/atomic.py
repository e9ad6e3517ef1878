"""Atomic file writing: write to a temporary file beside the target, then rename.

A killed or failing writer never leaves a half-written output behind: either the old file
(or nothing) or the complete new file is at ``path``. Files that only make sense together
(MakeDiffrSpots' three spot files) are written as a set: none is renamed into place before
all are written. A target that cannot be written is an :class:`NfjaxError` naming the
target, never the hidden temporary.

Targets that are not regular files are honoured: a symbolic link is written through (the
file it points to is replaced, the link stays), and a device or FIFO (``-o /dev/null``,
``-o /dev/stdout``, a named pipe) is written directly, since renaming onto it would
replace the device node with a regular file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence

from nfjax.errors import NfjaxError


def _cannot_write(path: Path, exc: OSError) -> NfjaxError:
    reason = exc.strerror or str(exc)
    reason = reason[:1].lower() + reason[1:]
    other = os.fspath(exc.filename) if exc.filename is not None else None
    # Name the file the system complained about only when it is neither the target nor our
    # temporary (e.g. a parent folder that is a file).
    if other and other != str(path) and not Path(other).name.endswith(".part"):
        reason += f": {other}"
    return NfjaxError(f"{path}: cannot write ({reason})")


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def refuse_package_folder(path: str | os.PathLike, what: str = "output") -> None:
    """NfjaxError when ``path`` lies inside the installed nfjax package: a parameter file
    that names no output folder writes beside itself, and the bundled example's lives
    there."""
    resolved = Path(path).resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        raise NfjaxError(f"{path}: refusing to write {what} inside the nfjax package "
                         f"({PACKAGE_DIR}); copy the parameter file to a folder of your own "
                         "or set OutputDirectory")


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a file could be written there; NfjaxError (one line, naming
    it) if it is empty, a directory, or below a file. Creates nothing: commands call it on
    their outputs before long work so that a bad output path fails first."""
    if not os.fspath(path):
        raise NfjaxError("output path is empty: give a file name")
    path = Path(path)
    if path.is_dir():
        raise NfjaxError(f"{path}: cannot write (is a directory)")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NfjaxError(f"{path}: cannot write ({blocker} is a file, not a folder)")
    refuse_package_folder(path)
    # The temporary is created in the target's folder (or the first existing folder above
    # it, where the missing ones are made), so that is what must be writable.
    target = _resolve(path)
    if _is_stream(target):
        where = target
    else:
        where = next((p for p in (target.parent,) + tuple(target.parent.parents)
                      if p.exists()), Path("."))
    if not os.access(where, os.W_OK):
        what = "" if where == target else f": {where} is not writable"
        raise NfjaxError(f"{path}: cannot write (permission denied{what})")
    return path


def _is_stream(path: Path) -> bool:
    """Whether ``path`` is an existing device or FIFO, written in place, not replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def _resolve(path: Path) -> Path:
    """The file a write to ``path`` should replace: the end of a chain of symbolic links
    (a dangling link's target is created), else ``path`` itself. A link to a device or
    FIFO (``/dev/stdout`` → ``/proc/self/fd/1`` → a pipe) stays as given: it is opened,
    not replaced, and a pipe's "target" is no path at all."""
    if not path.is_symlink() or _is_stream(path):
        return path
    return Path(os.path.realpath(path))


# Errors of the write itself (the caller's ``fh.write``), which carry no file name.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def _temporary(path: Path, made: list[Path]) -> tuple[int, str]:
    """A temporary file beside ``path``; the folders it had to make are appended to
    ``made`` (outermost first), so that a failed write can remove them again."""
    directory = path.parent if str(path.parent) else Path(".")
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        made.extend(reversed(missing))
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        check_target(path)   # names a folder that became a file since the first check
        raise _cannot_write(path, exc) from None


@contextlib.contextmanager
def atomic_write_many(paths: Sequence[str | os.PathLike], mode: str = "w",
                      **open_kwargs) -> Iterator[list[IO]]:
    """Open one temporary file per path; when the block succeeds, rename each onto its path.

    Yields the open files in the order of ``paths``. ``mode`` is ``"w"`` (text) or ``"wb"``
    (binary). Nothing is renamed until every file is written and synced; on any exception
    all temporaries, and any folder made for them, are removed and every target is left
    untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    named = [check_target(p) for p in paths]
    targets = [_resolve(p) for p in named]
    streams = [_is_stream(t) for t in targets]
    temps: list[str | None] = []
    handles: list[IO] = []
    made: list[Path] = []      # folders made for the targets: removed again on failure
    try:
        for target, stream in zip(targets, streams):
            if stream:
                temps.append(None)
                try:
                    handles.append(open(target, mode, **open_kwargs))
                except OSError as exc:
                    raise _cannot_write(target, exc) from None
                continue
            fd, tmp = _temporary(target, made)
            temps.append(tmp)
            try:
                handles.append(os.fdopen(fd, mode, **open_kwargs))
            except BaseException:
                os.close(fd)
                raise
        try:
            yield handles
        except OSError as exc:
            if exc.filename is not None or exc.errno not in _FULL:
                raise
            # The caller's write failed (a full disk, a quota): name what was being written.
            raise _cannot_write(_folder_or_file(named), exc) from None
        for target, tmp, fh in zip(targets, temps, handles):
            try:
                fh.flush()
                if tmp is not None:
                    os.fsync(fh.fileno())
                fh.close()
                if tmp is not None:
                    os.chmod(tmp, 0o644)
            except OSError as exc:
                raise _cannot_write(target, exc) from None
        # The targets were checked above, so these renames inside one folder do not fail in
        # practice; a crash between them can still mix old and new files.
        for target, tmp in zip(targets, temps):
            if tmp is None:
                continue
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _cannot_write(target, exc) from None
    except BaseException:
        for fh in handles:
            with contextlib.suppress(OSError):
                fh.close()
        for tmp in temps:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for folder in reversed(made):          # innermost first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _folder_or_file(paths: list[Path]) -> Path:
    """The one target, or for a set written together (they share a folder) a name that
    lists them: ``dir/{a,b,c}``."""
    if len(paths) == 1:
        return paths[0]
    return paths[0].parent / ("{" + ",".join(p.name for p in paths) + "}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). On any exception the temporary file is
    removed and ``path`` is left untouched.
    """
    with atomic_write_many([path], mode, **open_kwargs) as (fh,):
        yield fh
