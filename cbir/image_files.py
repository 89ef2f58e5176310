"""Which files of a folder are images: the suffixes of the formats Pillow decodes that a collection holds.
Shared by the build's folder listing (`apps.ingest.sources`) and the embedder's int8 calibration folder."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
