"""Readers and writers of MIDAS's file formats, one module per format."""

#: The codec of every text reader: UTF-8 with a leading byte-order mark skipped (Windows
#: editors add one, and it would otherwise glue itself to the first number or key).
TEXT_ENCODING = "utf-8-sig"
