"""numba compile settings shared by the compiled kernels (numba, a dependency)."""

from __future__ import annotations

import numba

__all__ = ["jit"]


def jit(func):
    """Compile ``func`` on first call, releasing the GIL; cached on disk when numba finds a
    writable cache folder, else compiled once per process."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(func)
    except RuntimeError:  # no writable cache location
        return numba.njit(nogil=True, error_model="numpy")(func)
