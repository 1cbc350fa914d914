"""The napari plugin (npe2): a reader that places tiles, and a widget that registers and fuses."""
