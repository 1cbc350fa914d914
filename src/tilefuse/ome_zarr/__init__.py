"""Writing OME-Zarr: the writer and its pyramid, chunk files, resuming an interrupted run."""
