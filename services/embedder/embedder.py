"""`Embedder`: image bytes or pixels -> VGG-16 feature vectors, in-process (no network).

The gRPC servicer uses it, and so does `cbir index build` when it embeds in-process. Build one
with `Embedder.from_settings(settings)`: it resolves the weights, builds the Keras model for the
feature, compiles it for the inference backend `settings.backend` (`compile_runner`: Keras, or
ONNX Runtime) and describes the result in `.info` (a `cbir.v1.ModelInfo`), whose `fingerprint` is
what an index bundle records to refuse vectors from a different model. Both backends give the
same vectors, so the fingerprint does not depend on the backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from cbir import local_features, metrics
from cbir.errors import BadImage
from cbir.v1 import common_pb2
from services.embedder import images
from services.embedder.devices import log_devices, resolve_precision
from services.embedder.aspect import AspectRunner, Pass
from services.embedder.calibration import calibration_images
from services.embedder.images import fit
from services.embedder.descriptor import Whitening
from services.embedder.model import (
    DIMENSIONS,
    INPUT_SHAPE,
    build_vgg16,
    compile_inference,
    compile_trunk,
    feature_model,
    pooling_name,
    trunk_model,
    with_precision,
)
from services.embedder.weights import Weights, apply_weights, conv_only, resolve_weights, save_weights

log = logging.getLogger(__name__)

SERVICE = "embedder"  # the `service` label of cbir_stage_seconds
BACKENDS = ("keras", "onnx")

Runner = Callable[[np.ndarray], np.ndarray]  # (N, H, W, 3) uint8 -> (N, D) vectors or a trunk's maps; any thread


def compile_runner(model, backend: Literal["keras", "onnx"] = "keras", *, precision: str = "float32",
                   calibration: Sequence[np.ndarray] = (), cache_dir: Path | None = None) -> Runner:
    """`model` (a feature model, or a descriptor model's trunk) compiled for inference by `backend`: "keras" (a
    traced TensorFlow function) or "onnx" (ONNX Runtime, exported from the same model, int8-quantized on the
    `calibration` images when `precision` is "int8", and checked against Keras's vectors; `OnnxUnsupported` or
    RuntimeError when it cannot be used, and then nothing falls back silently)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    keras_runner = compile_trunk(model) if len(model.outputs[0].shape) == 4 else compile_inference(model)
    if backend == "keras":
        return keras_runner
    from services.embedder.onnx_backend import checked_runner  # optional dependency: onnx, onnxruntime

    return checked_runner(model, reference=keras_runner, precision=precision, calibration=calibration,
                          cache_dir=cache_dir)


def onnx_calibration(settings, shapes) -> list[np.ndarray]:
    """The int8 calibration images (`calibration.calibration_images`) for `settings`; [] unless precision=int8."""
    if settings.precision != "int8":
        return []

    def decode(data: bytes) -> np.ndarray:
        keep_aspect = settings.resize != "squash"
        return images.load_image(data, max_pixels=settings.max_pixels, max_bytes=settings.max_image_bytes,
                                 size=source_side(settings) if keep_aspect else 224, keep_aspect=keep_aspect,
                                 source=keep_aspect)

    return calibration_images(settings.calibration, decode, shapes)


WHITENING_DIR = Path(__file__).resolve().parent / "whitening"


def load_whitening(name: str) -> Whitening | None:
    """The whitening named by the `whitening` setting: a shipped one (services/embedder/whitening/NAME.npz)
    or a path; None for ""."""
    if not name:
        return None
    path = WHITENING_DIR / f"{name}.npz"
    if not path.is_file():
        path = Path(name).expanduser()
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in WHITENING_DIR.glob("*.npz"))) or "none"
        raise ValueError(f"whitening {name!r} is neither a shipped whitening ({shipped}) nor a .npz file")
    return Whitening.load(path)


def passes(settings) -> list[Pass]:
    """The network passes of a descriptor model: squashed 224 x 224 (squash+keep_aspect), and aspect kept at
    input_size times each scale."""
    steps = [Pass("squash", 224)] if settings.resize == "squash+keep_aspect" else []
    return steps + [Pass("keep_aspect", max(32, round(settings.input_size * scale))) for scale in settings.scales]


def source_side(settings) -> int:
    """The longer side a descriptor model decodes images to: enough for its largest pass and the local features."""
    return max([step.size for step in passes(settings)] + [local_features.MAX_SIDE])


def descriptor_name(settings, whitening: Whitening | None) -> str:
    """ModelInfo.pooling of a descriptor model: every choice that shapes its vectors."""
    name = f"{settings.pooling}(p={settings.gem_p:g})" if settings.pooling in ("gem", "rgem") else settings.pooling
    name += f";source={source_side(settings)}"
    if settings.resize == "squash+keep_aspect":
        name += ";" + "+".join(str(step) for step in passes(settings))
    else:
        name += f";keep_aspect={settings.input_size}"
        if tuple(settings.scales) != (1.0,):
            name += ";scales=" + ",".join(f"{scale:g}" for scale in settings.scales)
    if whitening is not None:
        name += f";whitening={whitening.fingerprint}"
    return name


def model_info(*, feature: str, weights: Weights, gem_p: float, pooling: str = "gem",
               scales: tuple[float, ...] = (1.0,), pooling_text: str | None = None,
               dimension: int | None = None, local: str = "", precision: str = "float32") -> common_pb2.ModelInfo:
    """The ModelInfo of VGG-16 with these weights; `fingerprint` hashes everything that shapes the vectors.

    The fingerprint covers name, feature, dimension, weights fingerprint, preprocessing and
    pooling, but not `weights_source`: the same weights file found in the Keras cache or given by
    path gives the same vectors, so it gets the same fingerprint; nor `local` (the local features the
    model can also return, `local_features`), which do not change the vectors; nor `precision`: bfloat16
    maths give vectors within cosine 0.9999 of float32's, and a bundle's items and its queries may be
    embedded in either.
    """
    fields = dict(
        name="vgg16",
        feature=feature,
        dimension=dimension or DIMENSIONS[feature],
        weights_fingerprint=weights.fingerprint,
        preprocessing=weights.preprocessing,
        pooling=pooling_name(feature, gem_p, pooling, scales) if pooling_text is None else pooling_text,
    )
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return common_pb2.ModelInfo(
        **fields, weights_source=weights.source, fingerprint=f"vgg16-{feature}-{digest[:16]}", local_features=local,
        precision=precision,
    )


class Embedder:
    """A loaded VGG-16 feature model. `embed_pixels` and `embed_images` may be called from any thread."""

    def __init__(self, *, base, model, info: common_pb2.ModelInfo, preprocessing: str, runner: Runner | None = None,
                 max_batch: int = 32, max_pixels: int = 50_000_000, max_image_bytes: int | None = None,
                 input_size: int = 224, keep_aspect: bool = False):
        """`runner` runs `model` (see `compile_runner`); None compiles it for Keras. With `keep_aspect` (a
        descriptor model), `model` is the conv trunk, `runner` an `AspectRunner` that takes a list of images of
        any shape, and `input_size` the longer side images are decoded to (`source_side`)."""
        self._base = base
        self.model = model
        self.info = info
        self._preprocessing = preprocessing
        self.runner = runner if runner is not None else compile_inference(model)
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.input_size = input_size
        self.keep_aspect = keep_aspect

    @classmethod
    def from_settings(cls, settings) -> Embedder:
        """Resolve the weights (WeightsError when there are none), build the model. Not warmed up."""
        precision = resolve_precision(settings.precision, settings.backend, gpus=log_devices())
        keras_precision = precision if precision == "bfloat16" else "float32"  # int8: ONNX Runtime's, from float32
        weights = resolve_weights(settings)
        base = build_vgg16(include_top=weights.include_top)
        apply_weights(base, weights)
        if settings.feature == "gem" and weights.include_top:
            base = conv_only(base)
        if settings.resize != "squash":
            return cls._keep_aspect(settings, base, weights, precision, keras_precision)
        model = feature_model(with_precision(base, keras_precision), feature=settings.feature,
                              preprocessing=weights.preprocessing, gem_p=settings.gem_p,
                              pooling=settings.pooling, scales=settings.scales)
        info = model_info(feature=settings.feature, weights=weights, gem_p=settings.gem_p,
                          pooling=settings.pooling, scales=settings.scales, precision=precision)
        log.info(
            "model ready: vgg16 %s, %d-d, %s preprocessing%s, %s, fingerprint %s",
            info.feature, info.dimension, info.preprocessing,
            f", {info.pooling} pooling" if info.pooling else "", precision, info.fingerprint,
        )
        return cls(
            base=base, model=model, info=info, preprocessing=weights.preprocessing,
            # same vectors (checked), same fingerprint
            runner=compile_runner(model, settings.backend, precision=precision, cache_dir=settings.cache_dir,
                                  calibration=onnx_calibration(settings, [lambda image: image])),
            max_batch=settings.max_batch, max_pixels=settings.max_pixels, max_image_bytes=settings.max_image_bytes,
        )

    @classmethod
    def _keep_aspect(cls, settings, base, weights: Weights, precision: str, keras_precision: str) -> Embedder:
        whitening = load_whitening(settings.whitening)
        trunk = trunk_model(with_precision(base, keras_precision), preprocessing=weights.preprocessing)
        if whitening is not None:
            whitening.check_weights(weights.fingerprint)
        steps = passes(settings)
        calibration = onnx_calibration(settings, [lambda image, step=step: fit(image, *step) for step in steps])
        trunk_runner = compile_runner(trunk, settings.backend, precision=precision, calibration=calibration,
                                      cache_dir=settings.cache_dir)
        runner = AspectRunner(trunk_runner, passes=steps, pooling=settings.pooling,
                              gem_p=settings.gem_p, whitening=whitening, max_batch=settings.max_batch)
        info = model_info(feature="gem", weights=weights, gem_p=settings.gem_p,
                          pooling_text=descriptor_name(settings, whitening),
                          dimension=whitening.dimension if whitening is not None else None,
                          local=local_features.DESCRIPTION if settings.local_features else "", precision=precision)
        log.info("model ready: vgg16 block5_conv3, %s, %d-d, %s preprocessing, %s, fingerprint %s",
                 info.pooling, info.dimension, info.preprocessing, precision, info.fingerprint)
        if whitening is not None:
            log.info("whitening %s learned on: %s", whitening.fingerprint, whitening.source or "(no provenance given)")
        return cls(base=base, model=trunk, info=info, preprocessing=weights.preprocessing, runner=runner,
                   max_batch=settings.max_batch, max_pixels=settings.max_pixels,
                   max_image_bytes=settings.max_image_bytes, input_size=source_side(settings), keep_aspect=True)

    def with_runner(self, runner: Runner) -> Embedder:
        """The same model and info run by `runner` (e.g. `compile_runner(embedder.model, "onnx")`)."""
        return type(self)(
            base=self._base, model=self.model, info=self.info, preprocessing=self._preprocessing, runner=runner,
            max_batch=self.max_batch, max_pixels=self.max_pixels, max_image_bytes=self.max_image_bytes,
            input_size=self.input_size, keep_aspect=self.keep_aspect,
        )

    @property
    def dimension(self) -> int:
        return self.info.dimension

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> (224, 224, 3) uint8 RGB (descriptor models: (H, W, 3) in the image's
        proportions, longer side at most `input_size`); BadImage when it cannot be used."""
        with metrics.stage(SERVICE, "decode"):
            return images.load_image(data, max_pixels=self.max_pixels, max_bytes=self.max_image_bytes,
                                     size=self.input_size, keep_aspect=self.keep_aspect, source=self.keep_aspect)

    @property
    def has_local_features(self) -> bool:
        return bool(self.info.local_features)

    def local_features(self, image: np.ndarray, query: bool = False) -> list[bytes]:
        """The local features of one decoded image (`decode`): as an indexed item stores them, or as a query
        sends them (`query`: `local_features.QUERY_KEYPOINTS` keypoints, then those of its mirror image);
        [] when this model has none."""
        if not self.has_local_features:
            return []
        with metrics.stage(SERVICE, "local_features"):
            if not query:
                return [local_features.to_bytes(local_features.extract(image))]
            return [local_features.to_bytes(local_features.extract(variant, local_features.QUERY_KEYPOINTS))
                    for variant in (image, local_features.mirrored(image))]

    @property
    def has_regions(self) -> bool:
        """Whether `embed_pixels(..., regions=True)` gives region vectors (descriptor models)."""
        return self.keep_aspect

    def embed_pixels(self, batch, regions: bool = False) -> np.ndarray:
        """(N, 224, 224, 3) uint8 RGB -> (N, D) float32, in model calls of at most `max_batch` images.
        keep_aspect: a list of (H, W, 3) uint8 images of any shapes, and with `regions` (N, 1 + R, D): each
        image's vector followed by its region vectors (`descriptor.region_vectors`)."""
        if regions and not self.has_regions:
            raise ValueError("region vectors come from descriptor models (resize=keep_aspect or auto), not this one")
        if self.keep_aspect:
            if len(batch) == 0:
                return np.zeros((0, self.dimension), dtype=np.float32)
            with metrics.stage(SERVICE, "model"):
                return self.runner(list(batch), regions=regions)
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != INPUT_SHAPE or batch.dtype != np.uint8:
            raise ValueError(f"expected (N, 224, 224, 3) uint8 pixels, got {batch.shape} {batch.dtype}")
        if len(batch) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        parts = []
        for start in range(0, len(batch), self.max_batch):
            with metrics.stage(SERVICE, "model"):
                parts.append(self.runner(batch[start:start + self.max_batch]))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed_images(self, encoded: list[bytes]) -> list[np.ndarray | BadImage]:
        """Each image's (D,) float32 vector, or the BadImage that says why it could not be embedded."""
        results: list[np.ndarray | BadImage] = []
        good: list[int] = []
        pixels: list[np.ndarray] = []
        for data in encoded:
            try:
                pixels.append(self.decode(data))
            except BadImage as error:
                results.append(error)
            else:
                good.append(len(results))
                results.append(None)
        if pixels:
            for index, vector in zip(good, self.embed_pixels(pixels if self.keep_aspect else np.stack(pixels))):
                results[index] = vector
        return results

    def warm_up(self) -> None:
        """Run one batch through the model so that tracing and kernel set-up are not paid by a request."""
        with metrics.stage(SERVICE, "warm_up"):
            if self.keep_aspect:  # a landscape photo's shape; other shapes trace nothing new
                self.embed_pixels([np.zeros((self.input_size * 3 // 4 // 16 * 16, self.input_size, 3), np.uint8)])
            else:
                self.embed_pixels(np.zeros((1, *INPUT_SHAPE), dtype=np.uint8))

    def save_weights(self, path: str | Path) -> Path:
        """Write the network's weights as a Keras `.weights.h5` file that `weights=<path>` loads again."""
        return save_weights(self._base, Path(path), preprocessing=self._preprocessing)
