"""`Bundle`, one opened bundle version: its manifest, the mmapped index (Annoy or faiss, behind
`cbir.bundle.ann.AnnIndex`), the PCA, the item table and the input vectors, readable from many
threads at once until it is closed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

import numpy as np

from cbir.bundle.ann import AnnIndex
from cbir.bundle.items import ItemRecord, ItemTable
from cbir.bundle.layout import FEATURES_FILE, ITEMS_FILE, index_file
from cbir.bundle.local_store import LocalFeatureStore
from cbir.bundle.manifest import Manifest
from cbir.bundle.metadata import MetadataColumns
from cbir.bundle.versions import deleted_list_path
from cbir.pca import Pca


class Bundle:
    """One opened bundle version. Thread-safe for reads; `close()` only when no reader is left.

    - `manifest`: the typed `Manifest`;
    - `index`: the nearest-neighbour index (`cbir.bundle.ann.AnnIndex`: Annoy or faiss, as the manifest's
      `index_type` says), mmapped read-only (queries release the GIL and may run concurrently);
    - `pca`: the fitted `cbir.pca.Pca`, or None;
    - item lookups (`items_by_annoy_ids`, `find_items`) through a read-only SQLite connection per thread;
    - `features()`: the input vectors, memory-mapped;
    - `local`: the items' local features for geometric verification (`LocalFeatureStore`), or None;
    - `metadata`: the items' metadata as columns, to evaluate metadata filters (`MetadataColumns`);
    - `pdq`: the items' PDQ hashes (`cbir.pdq.RECORD`, memory-mapped), or None when the build made none.
    """

    def __init__(self, path: Path, root: Path | None, manifest: Manifest, index: AnnIndex, pca: Pca | None,
                 local: LocalFeatureStore | None = None, pdq: np.ndarray | None = None):
        self.path = path
        self.root = root
        self.manifest = manifest
        self.index = index
        self.pca = pca
        self.local = local
        self.pdq = pdq
        self._items = ItemTable(path, ITEMS_FILE)
        self.metadata = MetadataColumns(self._items, manifest.item_count, where=f"bundle {manifest.version}")

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def item_count(self) -> int:
        return self.manifest.item_count

    @property
    def metric(self) -> str:
        return self.manifest.metric

    @property
    def input_dimension(self) -> int:
        return self.manifest.input_dimension

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def index_type(self) -> str:
        return self.manifest.index_type

    @property
    def index_file(self) -> str:
        """The name of the index file in the version folder (`index.ann` or `index.faiss`)."""
        return index_file(self.manifest.index_type)

    @property
    def closed(self) -> bool:
        return self._items.closed

    @property
    def deleted_list(self) -> Path:
        """The deletion list that applies to this version: in its bundle root (the folder holding it)."""
        return deleted_list_path(self.root if self.root is not None else self.path.parent)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Input vectors -> index vectors: PCA (+ L2 norm) when the bundle has one, else float32 as is."""
        array = np.asarray(vectors, dtype=np.float32)
        return self.pca.transform(array) if self.pca is not None else array

    def features(self) -> np.ndarray:
        """The (item_count, input_dimension) float32 input vectors, memory-mapped read-only."""
        return np.load(self.path / FEATURES_FILE, mmap_mode="r", allow_pickle=False)

    def items_by_annoy_ids(self, annoy_ids: Sequence[int]) -> list[ItemRecord]:
        """Records for Annoy ids, in the order given; KeyError for an id the table lacks."""
        found = self._items.select("annoy_id", [int(i) for i in annoy_ids])
        try:
            return [found[int(i)] for i in annoy_ids]
        except KeyError as error:
            raise KeyError(f"Annoy id {error.args[0]} is not in {self.path / ITEMS_FILE}") from None

    def find_items(self, item_ids: Sequence[str]) -> list[ItemRecord | None]:
        """Records for item ids, in the order given; None where an id is not in the bundle."""
        found = self._items.select("item_id", list(item_ids))
        return [found.get(i) for i in item_ids]

    def iter_items(self, batch: int = 10_000) -> Iterable[ItemRecord]:
        """Every item in Annoy id order."""
        return self._items.iterate(batch)

    def count_items(self) -> int:
        """The rows in the item table (sqlite3.Error when it is unreadable)."""
        return self._items.count()

    def close(self) -> None:
        """Unmap the index and close the item table. No query may be running on it any more."""
        if self._items.close():
            self.index.close()
            if self.local is not None:
                self.local.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        dimension = self.manifest.index_dimension
        return f"Bundle({str(self.path)!r}, {self.item_count} items, {self.metric}, dim {dimension})"
