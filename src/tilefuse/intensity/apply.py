"""The per-tile intensity correction the fusion kernel applies right after reading a tile.

Pure numpy, no I/O: one float32 copy of the tile, then in-place arithmetic. A
:class:`TileCorrection` is small plain data (the flat and dark fields are shared by every tile
of an acquisition, so pickling one correction per task costs one field, not one per tile).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tilefuse.model.layout import TileSource

__all__ = [
    "CorrectedSource",
    "TileCorrection",
    "correct_tile",
    "corrected_layout",
    "tile_corrections",
]


def _as_f32(value: np.ndarray | None) -> np.ndarray | None:
    """float32 array; the very same object when it already is one (so tiles share a field)."""
    return None if value is None else np.asarray(value, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TileCorrection:
    """How to correct one tile's intensities: ``((data - dark) / flat) * gain + offset``.

    Every field is optional; a missing field is the identity. Fields are stored as float32;
    a field that already is a float32 array is kept as the same object, not copied, so the tiles
    of a layout share one flat field in memory and in a pickled task graph (build them with
    :func:`tile_corrections`). Do not modify a field after building corrections from it.

    Attributes
    ----------
    flat : numpy.ndarray, shape (c, *tile_spatial), float32, optional
        Flat field (illumination profile), mean 1 per channel. Any shape that broadcasts to the
        tile works: ``(1, *spatial)`` for all channels, ``(c, 1, y, x)`` for every z plane.
    dark : numpy.ndarray, shape (c, *tile_spatial), float32, optional
        Dark field (camera offset), same broadcasting rules as ``flat``.
    gain : numpy.ndarray, shape (c,), float32, optional
        Per-tile multiplicative gain, one per channel.
    offset : numpy.ndarray, shape (c,), float32, optional
        Per-tile additive offset, one per channel, applied after the gain.
    """

    flat: np.ndarray | None = None
    dark: np.ndarray | None = None
    gain: np.ndarray | None = None
    offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("flat", "dark", "gain", "offset"):
            object.__setattr__(self, name, _as_f32(getattr(self, name)))
        for name in ("gain", "offset"):
            value = getattr(self, name)
            if value is not None and value.ndim != 1:
                raise ValueError(f"{name} must have shape (c,), got {value.shape}")

    @property
    def is_identity(self) -> bool:
        """True when the correction changes nothing (every field missing)."""
        return all(v is None for v in (self.flat, self.dark, self.gain, self.offset))


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    """Shape (c,) -> (c, 1, ..., 1) so it broadcasts over ``ndim`` spatial axes."""
    return values.reshape(-1, *([1] * ndim))


def correct_tile(data: np.ndarray, corr: TileCorrection) -> np.ndarray:
    """Apply a tile correction: ``((data - dark) / flat) * gain + offset``.

    Parameters
    ----------
    data : numpy.ndarray, shape (c, *spatial), any real dtype
        Tile pixels as read (never modified; may be read-only).
    corr : TileCorrection

    Returns
    -------
    numpy.ndarray, shape (c, *spatial), float32
        A new array (one float32 copy of ``data``, corrected in place).
    """
    out = np.array(data, dtype=np.float32, copy=True)
    ndim = out.ndim - 1
    if corr.dark is not None:
        np.subtract(out, corr.dark, out=out)
    if corr.flat is not None:
        np.divide(out, corr.flat, out=out)
    if corr.gain is not None:
        np.multiply(out, _per_channel(corr.gain, ndim), out=out)
    if corr.offset is not None:
        np.add(out, _per_channel(corr.offset, ndim), out=out)
    return out


def tile_corrections(
    n_tiles: int,
    *,
    flat: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    gains: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
) -> list[TileCorrection]:
    """One :class:`TileCorrection` per tile, all sharing one flat and one dark field.

    Parameters
    ----------
    n_tiles : int
    flat, dark : numpy.ndarray, shape (c, *tile_spatial), optional
        Shared by every tile (converted to float32 once, then frozen).
    gains, offsets : numpy.ndarray, shape (n_tiles, c), optional
        Per-tile values, as returned by :func:`tilefuse.intensity.match_intensity`.

    Returns
    -------
    list of TileCorrection, length n_tiles
    """
    shared = {}
    for name, field in (("flat", flat), ("dark", dark)):
        if field is not None:
            field = np.array(field, dtype=np.float32, copy=True)
            field.setflags(write=False)
        shared[name] = field
    if shared["flat"] is not None and not np.all(shared["flat"] > 0):
        raise ValueError("the flat field must be positive everywhere")
    per_tile = {}
    for name, values in (("gain", gains), ("offset", offsets)):
        if values is not None:
            values = np.asarray(values, dtype=np.float32)
            if values.ndim != 2 or values.shape[0] != n_tiles:
                raise ValueError(f"{name}s must have shape (n_tiles={n_tiles}, c), "
                                 f"got {values.shape}")
        per_tile[name] = values
    return [
        TileCorrection(
            shared["flat"],
            shared["dark"],
            None if per_tile["gain"] is None else per_tile["gain"][i].copy(),
            None if per_tile["offset"] is None else per_tile["offset"][i].copy(),
        )
        for i in range(n_tiles)
    ]


@dataclass(frozen=True, slots=True, eq=False)
class CorrectedSource:
    """A tile source whose pixels come out corrected, ``(c, *spatial)`` float32.

    Its cache key includes a token of the correction, so the per-process tile cache holds the
    corrected tile: each tile is corrected once per worker, not once per output chunk.
    """

    source: TileSource
    correction: TileCorrection
    token: str

    @property
    def key(self) -> tuple:
        return ("corrected", self.source.key, self.token)

    def read(self) -> np.ndarray:
        return correct_tile(self.source.read(), self.correction)

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Planes ``start:stop``, corrected; None where the inner source cannot read them
        apart or the correction varies along z (then the tile is read whole)."""
        inner = getattr(self.source, "read_planes", None)
        fields = (self.correction.flat, self.correction.dark)
        if inner is None or any(f is not None and np.ndim(f) >= 3 and np.shape(f)[-3] != 1
                                for f in fields):  # broadcast to (c, z, y, x): z is third last
            return None
        data = inner(start, stop)
        return None if data is None else correct_tile(data, self.correction)


def _field_token(*fields: np.ndarray | None) -> str:
    digest = hashlib.sha1()
    for f in fields:
        digest.update(b"-" if f is None else np.ascontiguousarray(f, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def corrected_layout(layout, corrections: list[TileCorrection]):
    """The layout whose tiles read corrected (see :class:`CorrectedSource`).

    Parameters
    ----------
    layout : Layout
    corrections : list of TileCorrection, one per tile (e.g. from :func:`tile_corrections`)

    Returns
    -------
    Layout
        Same tiles, positions and output dtype; values are rounded to that dtype after fusion.
    """
    from dataclasses import replace

    if len(corrections) != len(layout.tiles):
        raise ValueError(f"{len(corrections)} corrections for {len(layout.tiles)} tiles")
    shared = _field_token(corrections[0].flat, corrections[0].dark) if corrections else ""
    tiles = []
    for tile, corr in zip(layout.tiles, corrections, strict=True):
        token = f"{shared}:{_field_token(corr.gain, corr.offset)}"
        tiles.append(replace(tile, source=CorrectedSource(tile.source, corr, token)))
    return replace(layout, tiles=tuple(tiles))
