"""Readers and writers of MIDAS's file formats, one module per format."""

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
