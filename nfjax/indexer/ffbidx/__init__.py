"""Drop-in replacement for the ``ffbidx`` Python package: ``from nfjax.indexer import ffbidx``.

Mirrors upstream's package layout (reference ``ffbidx-indexer.md`` §11.1): ``Indexer`` (the
class of ``ffbidx_cl.py``), the low-level ``indexer``, ``index``, ``release`` and
``runtime_check`` of the C extension, ``__version__``, and the extension itself as
``ffbidx.ffbidx_impl`` (which is where upstream's ``crystals`` lives). Everything is backed by
:mod:`nfjax.indexer.api`; this module adds no behaviour of its own.
"""
from __future__ import annotations

from nfjax import __version__ as _nfjax_version
from nfjax.indexer.api import Indexer, index, indexer, release, runtime_check
from nfjax.indexer.ffbidx import ffbidx_impl

#: ffbidx version this port follows, then the nfjax version ("<version>-<build>" as upstream).
__version__ = f"1.1.3-nfjax{_nfjax_version}"

__all__ = ["Indexer", "index", "indexer", "release", "runtime_check", "ffbidx_impl",
           "__version__"]
