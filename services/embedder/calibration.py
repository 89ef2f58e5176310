"""The photos that calibrate the int8 model (`precision=int8`): the activation ranges of the quantized
graph are the min and max seen while they run through the float32 one (`onnx_backend.quantize_int8`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cbir.errors import BadImage, SetupError
from cbir.image_files import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

CALIBRATION_PHOTOS = 64


def calibration_images(folder: Path, decode: Callable[[bytes], np.ndarray],
                       shapes: Sequence[Callable[[np.ndarray], np.ndarray]] = (lambda image: image,),
                       count: int = CALIBRATION_PHOTOS) -> list[np.ndarray]:
    """The first `count` photos of `folder` (by name, sub-folders included) that `decode` takes, each given as
    every one of `shapes` makes it (one per network pass); SetupError in words when none is usable."""
    folder = Path(folder).expanduser()
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    images: list[np.ndarray] = []
    used = 0
    for path in files:
        if used == count:
            break
        try:
            decoded = decode(path.read_bytes())
        except (BadImage, OSError) as error:
            log.warning("calibration: %s left out: %s", path, error)
            continue
        images.extend(shape(decoded) for shape in shapes)
        used += 1
    if not used:
        raise SetupError(f"the calibration folder {folder} holds no photo that can be decoded "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}); int8 needs photos like those you will index")
    if used < count:
        log.warning("calibration: %d photos in %s (%d are used where there are enough)", used, folder, count)
    return images
