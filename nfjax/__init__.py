"""nfjax: GPU-first JAX near-field HEDM reconstruction, MIDAS-compatible.

Importing nfjax turns on JAX's 64-bit mode (``jax_enable_x64``). Everything that feeds a
MIDAS-compatible file is computed in float64, as MIDAS does; the hot paths (screening on
the accelerator) ask for float32 explicitly, so enabling x64 does not slow them down.
Set ``NFJAX_NO_X64=1`` before import to leave JAX's setting alone.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

if _os.environ.get("NFJAX_NO_X64", "") not in ("1", "true", "yes"):
    import jax as _jax

    _jax.config.update("jax_enable_x64", True)

from nfjax.errors import NfjaxError  # noqa: E402

__all__ = ["NfjaxError", "__version__"]
