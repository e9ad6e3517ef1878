"""Correctness criteria for indexer tests (reference ffbidx-indexer.md §2.5), float64 NumPy."""
from __future__ import annotations

import numpy as np

#: Gold answer for every image* file (data/simple/README.md), vectors as rows, Å.
GOLD = np.array([[39.431335, 25.273994, 63.585350],
                 [28.513729, 60.642746, -41.786659],
                 [-29.096014, 20.499205, 9.895323]])


def cell_of(output_cells: np.ndarray, i: int) -> np.ndarray:
    """Cell i of ffbidx's (3, 3N) output as a (3, 3) float64 matrix with vectors as rows."""
    return np.asarray(output_cells[:, 3 * i:3 * i + 3], dtype=np.float64).T


def lattice_match(found: np.ndarray, gold: np.ndarray):
    """(max|T − rint T|, |det rint T|, misorientation in degrees) of found vs gold (§2.5)."""
    t = found @ np.linalg.inv(gold)
    t0 = np.rint(t)
    dev = float(np.max(np.abs(t - t0)))
    det = abs(float(np.linalg.det(t0)))
    if round(det) != 1:
        return dev, det, 180.0
    target = t0 @ gold
    # Kabsch: rotation R minimising |found − target R|, on the row vectors
    u, _, vt = np.linalg.svd(target.T @ found)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1.0, 1.0, d]) @ vt
    cosang = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return dev, det, float(np.degrees(np.arccos(cosang)))


def n_within(cell_rows: np.ndarray, spots_rows: np.ndarray, tol: float) -> int:
    """Spots whose three fractional Miller deviations are all within ±tol (§13.1)."""
    h = spots_rows.astype(np.float64) @ cell_rows.T
    return int(np.sum(np.all(np.abs(h - np.round(h)) <= tol, axis=1)))
