"""JAX port of the PSI fast feedback indexer (ffbidx) for serial crystallography.

Given a known unit cell and the reciprocal-lattice spots of one still image, find rotated
copies of the cell that put many spots near integer Miller indices (upstream ``ffbidx``'s
algorithm). Same Python API, defaults, layouts and error
messages as ``ffbidx`` (``from nfjax.indexer import ffbidx`` is a drop-in for ``import
ffbidx``), but pure JAX: any JAX device (CPU, GPU), pip-installed, no CUDA toolkit. Beyond
ffbidx: :meth:`Indexer.run_batch` indexes many frames in one vmapped call. Units: cells in Å,
spots in Å⁻¹. All indexing arithmetic is float32, as upstream, whatever ``jax_enable_x64``
says.

Upstream quirks and what this port does:

- Q1 cell log-sum starts at 1 (scores × 2^(1/n) in the geometric-mean part): **kept**
  (perfect lattices score −90.99822 as upstream).
- Q2 CUDA vector refinement does not reset its warp accumulators between rounds: **not
  emulated**; clean per-round least squares (directions differ by ~0.02–0.3°; lattices found
  are the same; raw scores of real images may differ from CUDA's by some close spots).
- Q3 wrong base index for the 2nd and later input cells: **fixed** (each cell's own vectors).
- Q4 angle count a multiple of 1024: **kept**. Q5 azimuth step 3−√5 rad (no π): **kept**.
- Q6 refined scores from stale/uninitialised residuals: **fixed**, the score always comes
  from the residuals of the final cell.
- Q7 sampling uses the first ``max_spots`` spots, refinement and ``crystals()`` all spots:
  **kept**. Q8 ``rint`` in sampling, round-half-away in refinement/crystals: **kept**.
- Q9 ``num_angle_points`` compared with ``max_output_cells``: **kept** (same message).
- Q10 ``index()`` default ``dist3=0.3`` vs ``Indexer.run`` 0.15: **kept**.
- Q11 ``triml == trimh`` / ``−triml < delta ≤ 0`` pass the ValueError checks and fail later as
  RuntimeError: **kept** (same types and messages).
- Q12 a C-ordered ``(3, 3)`` spot array is read column-wise: **kept** (it is the layout rule).
- Q13 8-factor products may underflow: **avoided**, log2 is summed per spot.
- Q14 no de-duplication of output cells: **kept** (``crystals()`` as upstream).
- Q15 (bulk example only): not applicable. Q16 unclamped ``acos``: **clamped**.

Speed without changing results: a score is ``fraction − (close spots + 1)``, so directions
and cells are ranked by their close-spot counts first (a cheap pass without logarithms) and
the geometric-mean fraction is evaluated only for the tied best; when more ties exist than the
fixed candidate slots hold (perfect lattices) the frame is rerun scoring everything.

Other documented differences: singular 3×3 systems in vector and cell refinement keep the
previous vector/cell (upstream produces inf/NaN); cell refinement solves normal equations in
float32 (upstream: Householder QR in float32); an illegal ``INDEXER_LOG_LEVEL`` warns instead
of aborting; ``redundant_calculations`` is accepted as an alias of ``redundant_computations``;
exceptions are ffbidx's types and also :class:`nfjax.errors.NfjaxError`.
"""
from __future__ import annotations

from nfjax.indexer.api import (Indexer, crystals, index, indexer, release, runtime_check,
                               select_device)
from nfjax.indexer.layouts import IndexerRuntimeError, IndexerValueError
from nfjax.indexer.simple_data import SimpleData, read_simple_data
from nfjax.indexer import ffbidx  # noqa: E402  (the drop-in namespace)

__all__ = ["Indexer", "crystals", "index", "indexer", "release", "runtime_check",
           "select_device", "IndexerRuntimeError", "IndexerValueError", "SimpleData",
           "read_simple_data", "ffbidx"]
