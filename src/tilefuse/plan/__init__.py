"""Deciding once per run, numpy only: geometry (bounds, output grid, chunk -> tiles), the
memory budget, and the description ``tilefuse info`` prints."""
