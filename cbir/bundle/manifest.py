"""`manifest.json`, the description of one bundle version, as a pydantic model: reading it checks
every field's presence and type, and a field that is wrong is reported in plain words as a
`BundleError` naming the file, the field, what it should be and what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from cbir.bundle.layout import FORMAT_VERSION, MANIFEST_FILE, REBUILD, IndexType, Metric
from cbir.errors import BundleError
from cbir.v1 import common_pb2

PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]

# Words for pydantic's error types, so that a person reads "an integer", not "int_type".
_EXPECTED = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
}


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: StrictStr
    bytes: StrictInt


class PcaSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    dimension: StrictInt
    whiten: StrictBool


class MilvusSpec(BaseModel):
    """Where a milvus bundle's index lives (cbir.bundle.milvus_index): the Milvus server's URI as the build
    reached it (`http://host:19530`), or a milvus-lite database, a path ending in .db (relative: inside the
    version folder); the collection of this version; the alias that names the live version's collection."""

    model_config = ConfigDict(frozen=True)

    uri: StrictStr
    collection: StrictStr
    alias: StrictStr


class Manifest(BaseModel):
    """`manifest.json`, typed. `model` holds every field of `cbir.v1.ModelInfo` by name.

    The field order is the key order of the JSON file.
    """

    model_config = ConfigDict(frozen=True)

    format_version: StrictInt
    name: StrictStr
    version: StrictStr
    created_at: StrictStr  # RFC 3339, UTC
    model: dict[str, Any]
    input_dimension: PositiveInt
    index_dimension: PositiveInt
    metric: Metric
    # Which index the bundle holds (absent from Annoy manifests, which stay as they were) and the
    # parameters it was built with (cbir.bundle.faiss_index: m, ef_construction, nlist, pq_m, ...).
    index_type: IndexType = "annoy"
    index_params: dict[str, StrictInt] = Field(default_factory=dict)
    milvus: MilvusSpec | None = None  # index_type "milvus" only: where its collection is
    trees: NonNegativeInt  # Annoy trees (>= 1); 0 for the faiss index types, which have none
    item_count: PositiveInt
    # The default search effort (a request's search_k = 0): Annoy's search_k, HNSW's efSearch or IVF's nprobe.
    default_search_k: PositiveInt
    pca: PcaSpec | None = None
    source: StrictStr
    # "rootsift:500@512" (cbir.local_features.DESCRIPTION) when every item's local features are stored
    local_features: StrictStr = ""
    files: dict[str, FileEntry]

    @property
    def model_fingerprint(self) -> str:
        return str(self.model.get("fingerprint", ""))

    def model_info(self) -> common_pb2.ModelInfo:
        known = {f.name for f in common_pb2.ModelInfo.DESCRIPTOR.fields}
        return common_pb2.ModelInfo(**{k: v for k, v in self.model.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        # Absent from manifests written before they existed: those read back and write out byte for byte.
        if not data["local_features"]:
            del data["local_features"]
        if data["index_type"] == "annoy":
            del data["index_type"]
        if not data["index_params"]:
            del data["index_params"]
        if data["milvus"] is None:
            del data["milvus"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def model_to_dict(model: common_pb2.ModelInfo) -> dict[str, Any]:
    """Every field of a ModelInfo by name, defaults included."""
    return {f.name: getattr(model, f.name) for f in model.DESCRIPTOR.fields}


def read_manifest(folder: Path) -> Manifest:
    """The manifest of the version folder `folder`; BundleError if it is unreadable or invalid."""
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}; the bundle is damaged, {REBUILD}") from error
    # Checked first: a manifest of another format may differ in any field, and its version says why.
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r} but this cbir reads format_version {FORMAT_VERSION}; "
            f"use the cbir release that wrote it, or {REBUILD}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise BundleError(f"{path} is not a valid manifest: {describe_problem(error)}; {REBUILD}") from None
    if manifest.index_type == "annoy" and manifest.trees < 1:
        raise BundleError(f"{path} is not a valid manifest: field 'trees' must be >= 1, found {manifest.trees}; {REBUILD}")
    return manifest


def describe_problem(error: ValidationError) -> str:
    """The first problem pydantic found, in plain words: `field 'trees' must be an integer, found
    str '5'`, `field files['index.ann']['bytes'] is missing`."""
    problem = error.errors()[0]
    location, kind, found = problem["loc"], problem["type"], problem.get("input")
    if not location:
        return "the manifest is not a JSON object"
    field = repr(location[0])
    if len(location) > 1:
        field = f"{location[0]}" + "".join(f"[{part!r}]" for part in location[1:])
    if kind == "missing":
        return f"field {field} is missing"
    if kind in _EXPECTED:
        return f"field {field} must be {_EXPECTED[kind]}, found {type(found).__name__} {found!r}"
    if kind == "greater_than_equal":
        return f"field {field} must be >= {problem['ctx']['ge']}, found {found!r}"
    if kind == "literal_error":
        return f"field {field} must be one of {problem['ctx']['expected']}, found {found!r}"
    return f"field {field}: {problem['msg']}, found {found!r}"
