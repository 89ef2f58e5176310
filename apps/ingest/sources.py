"""Listing a collection: a folder of images, or a CSV/JSONL manifest with an id and a path or URL per row.

Every item gets a stable id (the folder-relative path, or the manifest's id column) so that its
vector is never separated from it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import urllib.parse
from typing import Iterator

from cbir.download import Downloader, FetchError, FetchLimits, UrlPolicy
from cbir.image_files import IMAGE_SUFFIXES

ID_COLUMNS = ("id", "item_id", "ImageID")
LOCATION_COLUMNS = ("path", "url", "OriginalURL")


class SourceError(ValueError):
    """The collection cannot be listed: missing folder, manifest without the needed columns, ..."""


@dataclasses.dataclass(frozen=True)
class SourceItem:
    item_id: str
    location: str  # a local path or an http(s) URL: where the bytes are read from
    url: str  # what the index stores and shows: file:// URI or http(s) URL
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def is_remote(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme in ("http", "https")


def list_source(source: str | pathlib.Path) -> list[SourceItem]:
    """All items of a folder (recursive) or manifest (.csv, .jsonl), in a stable order."""
    path = pathlib.Path(source)
    if path.is_dir():
        items = list(_list_folder(path))
    elif path.is_file() and path.suffix.lower() == ".csv":
        items = list(_list_manifest(path, csv_rows(path)))
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        items = list(_list_manifest(path, jsonl_rows(path)))
    elif path.exists():
        raise SourceError(f"{path}: not a folder, .csv or .jsonl manifest")
    else:
        raise SourceError(f"{path}: no such folder or manifest")
    _check_unique(items, path)
    return items


def _list_folder(root: pathlib.Path) -> Iterator[SourceItem]:
    root = root.resolve()
    for file in sorted(root.rglob("*")):
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
            yield SourceItem(
                item_id=file.relative_to(root).as_posix(),
                location=str(file),
                url=file.as_uri(),
            )


def csv_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV manifest with a header line."""
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield number, row


def jsonl_rows(path: pathlib.Path, error: type[Exception] = SourceError) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL manifest; `error` (with the line's number) for a line that is not one."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{path}:{number}: not valid JSON ({problem.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: expected a JSON object per line")
            yield number, row


def _list_manifest(path: pathlib.Path, rows: Iterator[tuple[int, dict]]) -> Iterator[SourceItem]:
    base = path.resolve().parent
    for number, row in rows:
        item_id = _first(row, ID_COLUMNS)
        location = _first(row, LOCATION_COLUMNS)
        if not item_id or not location:
            raise SourceError(
                f"{path}:{number}: each row needs an id ({' or '.join(ID_COLUMNS)}) and a "
                f"location ({' or '.join(LOCATION_COLUMNS)})"
            )
        metadata = {
            str(key): str(value)
            for key, value in row.items()
            if key not in ID_COLUMNS + LOCATION_COLUMNS and value not in (None, "")
        }
        if is_remote(location):
            yield SourceItem(item_id, location, location, metadata)
        else:
            local = pathlib.Path(urllib.parse.urlsplit(location).path if location.startswith("file:") else location)
            local = (base / local).resolve() if not local.is_absolute() else local
            yield SourceItem(item_id, str(local), local.as_uri(), metadata)


def _first(row: dict, columns: tuple[str, ...]) -> str:
    for column in columns:
        value = row.get(column)
        if value not in (None, ""):
            return str(value).strip()
    return ""


def _check_unique(items: list[SourceItem], source: pathlib.Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise SourceError(f"{source}: item id {item.item_id!r} appears more than once; ids must be unique")
        seen.add(item.item_id)


def read_bytes(item: SourceItem, *, max_bytes: int, timeout_s: float = 20.0, downloader: Downloader | None = None) -> bytes:
    """The bytes of a local file or an http(s) URL (through `downloader`, or a default one that
    admits every address: a collection's manifest is the operator's own)."""
    if is_remote(item.location):
        if downloader is not None:
            return downloader.fetch(item.location).data
        downloader = Downloader(
            UrlPolicy(allow_private=True), FetchLimits(max_bytes=max_bytes, timeout_s=timeout_s, retries=0)
        )
        try:
            return downloader.fetch(item.location).data
        finally:
            downloader.close()
    path = pathlib.Path(item.location)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(f"file is {size} bytes, over the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as error:
        raise FetchError(f"cannot read {path}: {error.strerror or error}") from None
