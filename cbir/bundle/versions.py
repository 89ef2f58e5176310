"""A bundle root's bookkeeping: its version folders, the `current` file naming the live one (read,
replaced atomically, followed to find the folder to open), and the deletion list of item ids
removed from the collection."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cbir.bundle.files import replace_atomically
from cbir.bundle.inputs import InvalidBundleInput
from cbir.bundle.layout import CURRENT_FILE, DELETED_FILE, MANIFEST_FILE, REBUILD, is_version_name
from cbir.errors import BundleError


def list_versions(root: str | Path) -> list[str]:
    """The complete versions under a bundle root, oldest first (temporary build folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and is_version_name(p.name) and (p / MANIFEST_FILE).is_file()
    )


def read_current(root: str | Path) -> str | None:
    """The version `root/current` names, or None when there is no `current` file."""
    path = Path(root) / CURRENT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}") from error
    if not is_version_name(text):
        raise BundleError(
            f"{path} should hold one version name (like 20261124T120501Z) but holds {text[:80]!r}; "
            f"write the name of one of the versions in {path.parent} into it, or {REBUILD}"
        )
    return text


def set_current(root: str | Path, version: str) -> None:
    """Point `root/current` at `version` atomically (temp file, fsync, os.replace, fsync the folder)."""
    root = Path(root)
    if not (root / version / MANIFEST_FILE).is_file():
        raise BundleError(f"cannot make {version!r} current: {root / version} is not a bundle version")
    replace_atomically(root / CURRENT_FILE, version + "\n", temp_prefix=".current-")


def resolve_version_folder(path: Path, version: str | None) -> tuple[Path, Path | None]:
    """(version folder, bundle root or None) for a bundle root (following `current`, or taking
    `version`) or a version folder."""
    if version is not None:
        return _named_version(path, version), path
    if not path.exists():
        raise BundleError(
            f"no index bundle at {path}: the path does not exist. Build one with `cbir index build` "
            f"writing to {path}, or point to an existing bundle"
        )
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not an index bundle folder (a bundle root or a version folder)")
    if (path / CURRENT_FILE).exists():
        return _current_version(path), path
    if (path / MANIFEST_FILE).exists():
        return path, None
    found = list_versions(path)
    if found:
        raise BundleError(
            f"{path} has bundle versions ({', '.join(found[-5:])}) but no {CURRENT_FILE} file naming the live one; "
            f"write a version name into {path / CURRENT_FILE} (e.g. `echo {found[-1]} > {path / CURRENT_FILE}`), "
            f"or point to a version folder"
        )
    raise BundleError(
        f"no index bundle at {path}: it has neither a {CURRENT_FILE} file (bundle root) nor a {MANIFEST_FILE} "
        f"(bundle version). Build one with `cbir index build` writing to {path}"
    )


def _named_version(root: Path, version: str) -> Path:
    if not is_version_name(version):
        raise BundleError(f"{version!r} is not a bundle version name")
    folder = root / version
    if not (folder / MANIFEST_FILE).is_file():
        found = list_versions(root)
        raise BundleError(
            f"{folder} is not a bundle version (missing or without {MANIFEST_FILE})"
            + (f"; versions found: {', '.join(found[-5:])}" if found else "")
        )
    return folder


def _current_version(root: Path) -> Path:
    version = read_current(root)
    target = root / version
    if not (target / MANIFEST_FILE).is_file():
        found = list_versions(root)
        hint = ""
        if found:
            hint = f"versions found: {', '.join(found[-5:])}; write one of them into {root / CURRENT_FILE}, or "
        raise BundleError(
            f"{root / CURRENT_FILE} names version {version!r} but {target} is not a bundle version "
            f"(missing or without {MANIFEST_FILE}); {hint}{REBUILD}"
        )
    return target


def deleted_list_path(root: str | Path) -> Path:
    """Where the deletion list of the bundle root `root` is."""
    return Path(root) / DELETED_FILE


def read_deleted(root: str | Path) -> frozenset[str]:
    """The item ids in `root`'s deletion list (empty when there is none)."""
    path = deleted_list_path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read the deletion list {path}: {error}") from error
    return frozenset(item_id for line in text.split("\n") if (item_id := line.rstrip("\r")))


def add_deleted(root: str | Path, ids: Iterable[str]) -> int:
    """Add ids to `root`'s deletion list (atomically replaced); returns how many were new."""
    root = Path(root)
    ids = _deletable_ids(ids)
    listed = read_deleted(root)
    new = set(ids) - listed
    if new:
        _write_deleted(root, listed | new)
    return len(new)


def remove_deleted(root: str | Path, ids: Iterable[str]) -> int:
    """Take ids off `root`'s deletion list (they may be indexed again); returns how many were listed."""
    root = Path(root)
    ids = set(_deletable_ids(ids))
    listed = read_deleted(root)
    gone = listed & ids
    if gone:
        _write_deleted(root, listed - gone)
    return len(gone)


def _deletable_ids(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    for item_id in ids:
        if not isinstance(item_id, str) or not item_id or "\n" in item_id or "\r" in item_id:
            raise InvalidBundleInput(f"cannot list {item_id!r} in a deletion list: ids are non-empty, one line each")
    return ids


def _write_deleted(root: Path, ids: Iterable[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{item_id}\n" for item_id in sorted(ids))
    replace_atomically(deleted_list_path(root), text, temp_prefix=".deleted-")
