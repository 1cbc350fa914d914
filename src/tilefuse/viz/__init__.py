"""Pictures: the preview with tile outlines and links, and overviews of a written image."""
