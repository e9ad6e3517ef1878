"""Atomic file writing: write to a temporary file beside the target, then rename.

A killed or failing writer never leaves a half-written output behind: either the old file
(or nothing) or the complete new file is at ``path``. Files that only make sense together
(MakeDiffrSpots' three spot files) are written as a set: none is renamed into place before
all are written. A target that cannot be written is an :class:`NfjaxError` naming the
target, never the hidden temporary.
"""
from __future__ import annotations

import contextlib
import os
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
    return path


def _temporary(path: Path) -> tuple[int, str]:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
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
    all temporaries are removed and every target is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    targets = [check_target(p) for p in paths]
    temps: list[str] = []
    handles: list[IO] = []
    try:
        for target in targets:
            fd, tmp = _temporary(target)
            temps.append(tmp)
            try:
                handles.append(os.fdopen(fd, mode, **open_kwargs))
            except BaseException:
                os.close(fd)
                raise
        yield handles
        for target, tmp, fh in zip(targets, temps, handles):
            try:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                os.chmod(tmp, 0o644)
            except OSError as exc:
                raise _cannot_write(target, exc) from None
        # The targets were checked above, so these renames inside one folder do not fail in
        # practice; a crash between them can still mix old and new files.
        for target, tmp in zip(targets, temps):
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _cannot_write(target, exc) from None
    except BaseException:
        for fh in handles:
            with contextlib.suppress(OSError):
                fh.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). On any exception the temporary file is
    removed and ``path`` is left untouched.
    """
    with atomic_write_many([path], mode, **open_kwargs) as (fh,):
        yield fh
