"""Bundled example data: the MIDAS Au NF-HEDM example (``au/``).

``ps_au.txt`` (parameter file), ``grs.csv`` (the 4 far-field grains) and ``Au_txt.mic``
(the known synthetic microstructure) from MIDAS's ``NF_HEDM/Example``.
"""
from __future__ import annotations

from pathlib import Path

AU_DIR = Path(__file__).resolve().parent / "au"


def au_example() -> dict[str, Path]:
    """Paths of the bundled Au example files."""
    return {
        "params": AU_DIR / "ps_au.txt",
        "grains": AU_DIR / "grs.csv",
        "mic": AU_DIR / "Au_txt.mic",
    }
