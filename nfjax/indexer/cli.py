"""``nfjax index FILE... [--method M] [--json]``: index simple-data spot files.

Owns the command's output only: for each file it runs :meth:`Indexer.run` (Python defaults)
and :meth:`Indexer.crystals`, then prints the best cell (``argmin`` of the scores, real space,
Å), its score, the number of spots that cell indexes and the number of crystals found. A
spot counts as indexed by the ``crystals()`` coverage rule: error < 0.00075 Å⁻¹ to the
induced spot for ``ifssr``; for ``raw``/``ifss``/``ifse`` the Miller-space error < 0.1
(upstream's 0.00075 default is meaningless in Miller units). Timings exclude compilation: a
call that compiled is repeated and the repeat is reported. It never writes files.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np

from nfjax.errors import NfjaxError
from nfjax.indexer.api import Indexer, covered_spots
from nfjax.indexer.simple_data import read_simple_data

MILLER_THRESHOLD = 0.1
RECIPROCAL_THRESHOLD = 0.00075


def index_file(ix: Indexer, path, method: str) -> dict:
    """Index one file; returns the JSON record of the command (plus ``crystals``)."""
    data = read_simple_data(path)
    threshold = RECIPROCAL_THRESHOLD if method == "ifssr" else MILLER_THRESHOLD
    compiled: list[str] = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            compiled.append(event)

    def once():
        t0 = time.perf_counter()
        cells, scores = ix.run(data.spots, data.cell, method=method)
        found = ix.crystals(cells, data.spots, scores, method=method, threshold=threshold)
        return cells, scores, found, time.perf_counter() - t0

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        cells, scores, found, seconds = once()
    except NfjaxError as exc:     # a bad cell or spot list: say which file holds it
        raise type(exc)(f"{path}: {exc}") from None
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    if compiled:  # report the steady-state time, as a pipeline calling run() per frame sees
        cells, scores, found, seconds = once()
    best = int(np.argmin(scores))
    cell = np.asarray(cells[:, 3 * best:3 * best + 3].T, dtype=np.float64)
    n_idx = int(covered_spots(cell, data.spots.T, method, threshold).sum())
    return {"file": str(path), "cell": [[round(float(v), 6) for v in row] for row in cell],
            "score": float(scores[best]), "indexed_spots": n_idx,
            "n_crystals": 0 if found is None else int(len(found)), "seconds": seconds,
            "crystals": [] if found is None else [int(i) for i in found],
            "n_spots": int(data.spots.shape[1]), "best": best}


def run_index(args) -> int:
    """Entry point called by ``nfjax.cli`` with ``args.files``, ``args.method``, ``args.json``."""
    import sys

    ix = Indexer()
    failed = []
    for path in args.files:
        try:
            rec = index_file(ix, path, args.method)
        except NfjaxError as exc:
            if len(args.files) == 1:
                raise
            # One bad frame in a batch: say so and go on with the others.
            print(f"nfjax: error: {exc}", file=sys.stderr, flush=True)
            failed.append(str(path))
            continue
        if args.json:
            keys = ("file", "cell", "score", "indexed_spots", "n_crystals", "seconds")
            print(json.dumps({k: rec[k] for k in keys}), flush=True)
            continue
        unit = "1/Å" if args.method == "ifssr" else ("" if args.method == "raw" else "(Miller)")
        print(f"{rec['file']}: best cell {rec['best']} of 32, score {rec['score']:.6g} {unit}, "
              f"{rec['indexed_spots']} of {rec['n_spots']} spots indexed, "
              f"{rec['n_crystals']} crystal(s) {rec['crystals']}, {rec['seconds'] * 1e3:.1f} ms")
        for name, vec in zip("abc", rec["cell"]):
            length = float(np.linalg.norm(vec))
            print(f"  {name} = ({vec[0]:10.4f} {vec[1]:10.4f} {vec[2]:10.4f})  |{name}| = "
                  f"{length:.3f} Å", flush=True)
    if failed:
        raise NfjaxError(f"{len(failed)} of {len(args.files)} files could not be indexed "
                         f"(first: {failed[0]})")
    return 0
