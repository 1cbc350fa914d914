# The public API for type checkers and editors: __init__.py imports these on first use.
from tilefuse import (
    cli as cli,
)
from tilefuse import (
    demo as demo,
)
from tilefuse import (
    errors as errors,
)
from tilefuse import (
    fusion as fusion,
)
from tilefuse import (
    intensity as intensity,
)
from tilefuse import (
    io as io,
)
from tilefuse import (
    model as model,
)
from tilefuse import (
    napari as napari,
)
from tilefuse import (
    ome_tiff as ome_tiff,
)
from tilefuse import (
    ome_zarr as ome_zarr,
)
from tilefuse import (
    pipeline as pipeline,
)
from tilefuse import (
    plan as plan,
)
from tilefuse import (
    registration as registration,
)
from tilefuse import (
    runner as runner,
)
from tilefuse import (
    testing as testing,
)
from tilefuse import (
    viz as viz,
)
from tilefuse.errors import InputError as InputError
from tilefuse.fusion.cycles import fuse_cycles as fuse_cycles
from tilefuse.fusion.graph import FusionPlan as FusionPlan
from tilefuse.fusion.graph import SeriesPlan as SeriesPlan
from tilefuse.fusion.graph import fuse as fuse
from tilefuse.fusion.graph import plan_fusion as plan_fusion
from tilefuse.io.readers import layout_from_arrays as layout_from_arrays
from tilefuse.io.readers import read_layout as read_layout
from tilefuse.io.readers import write_csv_layout as write_csv_layout
from tilefuse.io.readers import write_tileconfig as write_tileconfig
from tilefuse.model.layout import Layout as Layout
from tilefuse.model.layout import Tile as Tile
from tilefuse.model.mosaic import Mosaic as Mosaic
from tilefuse.model.timeseries import TimeSeries as TimeSeries
from tilefuse.ome_tiff.writer import write_ome_tiff as write_ome_tiff
from tilefuse.ome_zarr.writer import read_ome_zarr_level as read_ome_zarr_level
from tilefuse.ome_zarr.writer import write_ome_zarr as write_ome_zarr
from tilefuse.registration import register as register
from tilefuse.registration.cycles import align_cycles as align_cycles

__version__: str
__all__: list[str]
