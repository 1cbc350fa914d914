"""The data model: tiles and layouts (frozen plain data), time series, physical units."""
