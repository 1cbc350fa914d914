"""Fusing one output chunk from its tiles (resample, blend, the numpy kernel; the compiled
kernel in ``_numba``) and the dask graph over all chunks."""
