"""Readers and writers of MIDAS's file formats, one module per format."""
from pathlib import Path

#: The codec of every text reader: UTF-8 with a leading byte-order mark skipped (Windows
#: editors add one, and it would otherwise glue itself to the first number or key).
TEXT_ENCODING = "utf-8-sig"


def is_number(token: str) -> bool:
    """Whether ``token`` parses as a float: readers use it to name the offending field of
    a line that did not parse."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of ``path``; a missing file or a directory is an
    :class:`~nfjax.errors.InputFileError` naming ``what`` was expected (other OS errors
    pass through: the CLI prints them as one line)."""
    from nfjax.errors import InputFileError

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, expected a {what}") from None
