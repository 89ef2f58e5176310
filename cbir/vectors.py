"""float32 vectors on the wire: `cbir.v1.Vector` holds little-endian float32 bytes and a dimension."""

import numpy as np

from cbir.errors import InvalidRequest
from cbir.v1 import common_pb2

_FLOAT32_LE = np.dtype("<f4")


def to_proto(vector: np.ndarray) -> common_pb2.Vector:
    array = np.asarray(vector, dtype=_FLOAT32_LE).reshape(-1)
    return common_pb2.Vector(dimension=array.size, data=array.tobytes())


def from_proto(message: common_pb2.Vector, expected_dimension: int | None = None) -> np.ndarray:
    """The vector as a float32 array; InvalidRequest when it is malformed or of the wrong size."""
    if message.dimension == 0:
        raise InvalidRequest("vector is empty: dimension must be > 0")
    if len(message.data) != 4 * message.dimension:
        raise InvalidRequest(
            f"vector data holds {len(message.data)} bytes but dimension {message.dimension} "
            f"needs {4 * message.dimension} (float32, little-endian)"
        )
    if expected_dimension is not None and message.dimension != expected_dimension:
        raise InvalidRequest(
            f"vector has dimension {message.dimension}, this index expects {expected_dimension}"
        )
    array = np.frombuffer(message.data, dtype=_FLOAT32_LE).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise InvalidRequest("vector contains NaN or infinite values")
    return array
