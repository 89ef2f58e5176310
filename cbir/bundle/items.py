"""The item table `items.sqlite`, row i = Annoy id i: written once at build time, then read through
a read-only SQLite connection per thread."""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbir.errors import BundleError

_COLUMNS = "annoy_id, item_id, url, metadata"
# Under SQLite's default limit of host parameters per statement.
_LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class ItemRecord:
    annoy_id: int
    item_id: str
    url: str
    metadata: dict[str, str]


def write_items(path: Path, ids: Sequence[str], urls: Sequence[str], metadata_rows: Sequence[str | None]) -> None:
    """Create the item table at `path`; row i gets Annoy id i."""
    conn = sqlite3.connect(path)
    try:
        # The file is built in a scratch folder that is thrown away on failure: no journal needed.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "CREATE TABLE items ("
            " annoy_id INTEGER PRIMARY KEY,"
            " item_id TEXT NOT NULL UNIQUE,"
            " url TEXT NOT NULL,"
            " metadata TEXT"  # JSON object of strings; NULL when the item has none
            ")"
        )
        with conn:
            conn.executemany(
                f"INSERT INTO items ({_COLUMNS}) VALUES (?, ?, ?, ?)",
                zip(range(len(ids)), ids, urls, metadata_rows),
            )
    finally:
        conn.close()


def _record(row: tuple) -> ItemRecord:
    annoy_id, item_id, url, metadata = row
    return ItemRecord(annoy_id, item_id, url, json.loads(metadata) if metadata else {})


class ItemTable:
    """Reads of one version's item table; thread-safe, one connection per thread until `close()`."""

    def __init__(self, folder: Path, file_name: str):
        self._folder = folder
        # immutable=1: the file never changes, so SQLite skips locking (and works on read-only mounts).
        self._uri = f"file:{urllib.parse.quote(str(folder.resolve() / file_name))}?mode=ro&immutable=1"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self.closed = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self.closed:
                    raise BundleError(f"bundle {self._folder} is closed")
                conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def count(self) -> int:
        return self.connection().execute("SELECT count(*) FROM items").fetchone()[0]

    def select(self, column: str, keys: list) -> dict:
        """{key: ItemRecord} for the rows whose `column` ("annoy_id" or "item_id") is in `keys`."""
        db = self.connection()
        found: dict = {}
        position = 0 if column == "annoy_id" else 1
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE {column} IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            for row in rows:
                found[row[position]] = _record(row)
        return found

    def iterate(self, batch: int) -> Iterable[ItemRecord]:
        """Every item in Annoy id order, `batch` rows per query."""
        db = self.connection()
        last = -1
        while True:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE annoy_id > ? ORDER BY annoy_id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = rows[-1][0]

    def field_values(self, field: str) -> list:
        """Every item's value of one metadata field, in Annoy id order (None where the item lacks it). SQLite
        reads the field out of the JSON (json_extract), so only that field's values reach Python."""
        path = f'$."{field}"'  # a quoted key: dots and spaces in field names are plain characters
        rows = self.connection().execute("SELECT json_extract(metadata, ?) FROM items ORDER BY annoy_id", (path,))
        return [value for (value,) in rows]

    def field_names(self) -> list[str]:
        """The metadata fields of the items, sorted (one pass over the whole table)."""
        rows = self.connection().execute(
            "SELECT DISTINCT j.key FROM items, json_each(items.metadata) AS j WHERE items.metadata IS NOT NULL"
        )
        return sorted(key for (key,) in rows)

    def close(self) -> bool:
        """Close every connection; False if it was closed already."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        return True
