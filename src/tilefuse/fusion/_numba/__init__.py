"""The compiled chunk kernel (numba): the numpy kernel's mosaic, faster."""
