"""Writing OME-Zarr: the writer and its pyramid, chunk files, resuming an interrupted run."""

NGFF_VERSIONS = ("0.4", "0.5")
"""OME-NGFF versions written: 0.5 on zarr v3 (the default), 0.4 on zarr v2."""
