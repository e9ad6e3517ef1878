"""Stand-in for upstream's C extension ``ffbidx.ffbidx_impl`` (handle-based functions and
``crystals``), backed by :mod:`nfjax.indexer.api`."""
from __future__ import annotations

from nfjax.indexer.api import crystals, index, indexer, release, runtime_check

__all__ = ["crystals", "index", "indexer", "release", "runtime_check"]
