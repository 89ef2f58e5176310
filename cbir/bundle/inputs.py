"""The arguments of `write_bundle`, checked before anything is written: each problem raises
`InvalidBundleInput` naming the argument, what it should be and what was given."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbir.bundle.layout import METRICS
from cbir.errors import BundleError
from cbir.v1 import common_pb2

# Finite-value checks go this many rows at a time: no n x d boolean copy of a big collection.
_FINITE_CHUNK = 65536


class InvalidBundleInput(BundleError, ValueError):
    """write_bundle was given something it cannot build a bundle from."""


@dataclass(frozen=True)
class BundleInputs:
    """write_bundle's items, checked: float32 vectors and metadata as JSON text (None: no metadata)."""

    ids: list[str]
    urls: list[str]
    vectors: np.ndarray
    metadata_rows: list[str | None]

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])


def validate_inputs(
    ids: Sequence[str], urls: Sequence[str], vectors: Any, model: Any, metric: str, trees: Any,
    pca_dimension: Any, metadata: Sequence[Mapping[str, Any] | None] | None,
) -> BundleInputs:
    """The items checked and converted; InvalidBundleInput for the first problem found."""
    _check_model(model)
    ids = _checked_ids(ids)
    urls = _checked_urls(urls)
    array = _checked_vectors(vectors, ids, urls, model)
    _check_parameters(metric, trees, pca_dimension, model.dimension, len(ids))
    return BundleInputs(ids, urls, array, _metadata_rows(metadata, len(ids)))


def _check_model(model: Any) -> None:
    if not isinstance(model, common_pb2.ModelInfo):
        raise InvalidBundleInput(f"model must be a cbir.v1.ModelInfo, got {type(model).__name__}")
    if model.dimension < 1:
        raise InvalidBundleInput("model.dimension must be >= 1 (the length of the model's vectors)")
    if not model.fingerprint:
        raise InvalidBundleInput(
            "model.fingerprint is empty: the bundle must record which model made its vectors"
        )


def _checked_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    if not ids:
        raise InvalidBundleInput("no items: ids is empty")
    for i, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id:
            raise InvalidBundleInput(f"ids[{i}] is {item_id!r}: every id must be a non-empty string")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = list(dict.fromkeys(x for x in ids if x in seen or seen.add(x)))
        shown = ", ".join(repr(x) for x in dupes[:5])
        raise InvalidBundleInput(f"ids are not unique: {len(dupes)} ids occur more than once, e.g. {shown}")
    return ids


def _checked_urls(urls: Sequence[str]) -> list[str]:
    urls = list(urls)
    for i, url in enumerate(urls):
        if not isinstance(url, str):
            raise InvalidBundleInput(f"urls[{i}] is {url!r}: every URL must be a string")
    return urls


def _checked_vectors(vectors: Any, ids: list[str], urls: list[str], model: common_pb2.ModelInfo) -> np.ndarray:
    array = np.asarray(vectors)
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidBundleInput(f"vectors must be floating point (float32), got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise InvalidBundleInput(f"vectors must be a 2-d array (items x dimension), got shape {array.shape}")
    if not len(ids) == len(urls) == array.shape[0]:
        raise InvalidBundleInput(
            f"lengths differ: {len(ids)} ids, {len(urls)} urls, {array.shape[0]} vectors (one of each per item)"
        )
    if array.shape[1] != model.dimension:
        raise InvalidBundleInput(
            f"vectors have dimension {array.shape[1]} but model {model.name or '?'}/{model.feature or '?'} "
            f"makes {model.dimension}-d vectors"
        )
    for start in range(0, array.shape[0], _FINITE_CHUNK):
        finite = np.isfinite(array[start : start + _FINITE_CHUNK]).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise InvalidBundleInput(f"vectors hold NaN or infinite values, e.g. item {ids[row]!r} (row {row})")
    return array


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_parameters(metric: str, trees: Any, pca_dimension: Any, input_dimension: int, item_count: int) -> None:
    if metric not in METRICS:
        raise InvalidBundleInput(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if not _is_integer(trees) or trees < 1:
        raise InvalidBundleInput(f"trees must be an integer >= 1, got {trees!r}")
    if not _is_integer(pca_dimension) or pca_dimension < 0:
        raise InvalidBundleInput(f"pca_dimension must be an integer >= 0 (0 = no PCA), got {pca_dimension!r}")
    if pca_dimension and pca_dimension >= input_dimension:
        raise InvalidBundleInput(
            f"pca_dimension {pca_dimension} must be smaller than the input dimension {input_dimension}"
        )
    if pca_dimension and pca_dimension > item_count:
        raise InvalidBundleInput(
            f"pca_dimension {pca_dimension} is larger than the number of items ({item_count}): "
            "PCA cannot find more directions than there are vectors"
        )


def _metadata_rows(metadata: Sequence[Mapping[str, Any] | None] | None, item_count: int) -> list[str | None]:
    if metadata is None:
        return [None] * item_count
    metadata = list(metadata)
    if len(metadata) != item_count:
        raise InvalidBundleInput(f"metadata has {len(metadata)} entries for {item_count} items")
    rows: list[str | None] = []
    for i, entry in enumerate(metadata):
        if entry is None or (isinstance(entry, Mapping) and not entry):
            rows.append(None)
        elif isinstance(entry, Mapping):
            rows.append(json.dumps({str(k): str(v) for k, v in entry.items()}, ensure_ascii=False))
        else:
            raise InvalidBundleInput(f"metadata[{i}] must be a mapping or None, got {type(entry).__name__}")
    return rows
