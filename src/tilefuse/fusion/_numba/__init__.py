"""The compiled chunk kernel (numba, ``tilefuse[fast]``): the numpy kernel's mosaic, faster."""
