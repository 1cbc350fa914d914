"""tilefuse."""
