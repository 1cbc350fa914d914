"""BigStitcher / BigDataViewer SpimData XML (``dataset.xml``): its affines, writing a registration
back into one, and writing one beside a fused OME-Zarr.

Reading a ``dataset.xml`` as tiles is :func:`tilefuse.io.readers.bigstitcher.read_bigstitcher`
(through :func:`tilefuse.read_layout`); this package holds the XML side only.
"""

from __future__ import annotations

from tilefuse.bdv.spimdata import (
    SpimDataXml,
    compose,
    from_tilefuse,
    read_spimdata,
    to_tilefuse,
)
from tilefuse.bdv.write import (
    BDV_SUFFIX,
    REGISTRATION_NAME,
    check_bdv_sidecar,
    prepend_transforms,
    write_bdv_xml,
)

__all__ = ["BDV_SUFFIX", "REGISTRATION_NAME", "SpimDataXml", "check_bdv_sidecar", "compose",
           "from_tilefuse", "prepend_transforms", "read_spimdata", "to_tilefuse",
           "write_bdv_xml"]
