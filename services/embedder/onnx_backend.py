"""Optional ONNX Runtime inference for the embedder (`CBIR_EMBEDDER_BACKEND=onnx`).

The same Keras model (same weights, same preprocessing and pooling) is written out as an ONNX graph —
layer by layer, from the Keras weights, with no converter package — and run by ONNX Runtime. Two kinds
of model translate: the single-scale feature models (`gem` with GeM, MAC or average pooling on the
squashed 224 x 224 input, and `fc1`), and the descriptor models' trunk (`model.trunk_model`: images
of any size -> block5_conv3 maps, pooled in NumPy by `aspect.AspectRunner`). Anything else (e.g.
multi-scale in the graph) raises `OnnxUnsupported`, which names the layer. On a host with a GPU and
the `onnxruntime-gpu` package, the CUDA provider is used.

`precision="int8"` quantizes the graph statically (`quantize_int8`: int8 weights per channel, uint8
activations calibrated on photos like those to be indexed), about 3x float32 on a CPU with VNNI or
AMX-INT8 (BENCHMARKS.md). The quantized graph is kept in the cache folder for the next start.

Vectors stay equivalent: at load, `checked_runner` runs check pixels through both and refuses the ONNX
model unless every vector has cosine >= `MIN_COSINE` (0.9999; int8: `MIN_COSINE_INT8`) with Keras's
float32 ones. The model fingerprint is therefore unchanged: bundles built with one backend serve
queries from the other.
Install with `pip install -e ".[onnx]"`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.embedder.descriptor import pool

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
# int8 maths: vectors measured at cosine >= 0.999 to float32 with the ImageNet weights (BENCHMARKS.md); the
# check refuses a graph that is clearly off, the hard evaluation is what showed the ranking holds.
MIN_COSINE_INT8 = 0.99
ONNX_PRECISIONS = ("float32", "int8")
CHECK_PHOTOS = 8
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; newer `onnx` packages default to IR versions older runtimes refuse
VECTORS, MAPS = "vectors", "maps"  # the graph's output: a feature model's vectors, a trunk's feature maps


class OnnxUnsupported(RuntimeError):
    """The Keras model has a layer this exporter does not translate."""


def _flat_layers(model):
    """The layers of a linear Keras model, nested models expanded, input layers left out."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def export_onnx(model) -> bytes:
    """A Keras model as a serialized ONNX model: a feature model `(N, 224, 224, 3) uint8 -> (N, D) float32`
    (output "vectors"), or a trunk (`model.trunk_model`) `(N, H, W, 3) uint8 -> (N, H/16, W/16, 512) float32` for
    images of any size (output "maps")."""
    import keras
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from services.embedder.model import _CAFFE_MEAN_BGR, _TORCH_MEAN_RGB, _TORCH_STD_RGB, GeMPooling, L2Normalize, Preprocess

    nodes, inits = [], []
    counter = iter(range(10**6))

    def const(array, name=None) -> str:
        name = name or f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(op, inputs, **attrs) -> str:
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    x = node("Cast", ["pixels"], to=TensorProto.FLOAT)
    x = node("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
    layout = "NCHW"
    dimension = None
    for layer in _flat_layers(model):
        if isinstance(layer, Preprocess):
            if layer.mode == "caffe":
                indices = "bgr"
                inits.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), indices))
                x = node("Gather", [x, indices], axis=1)
                x = node("Sub", [x, const(np.array(_CAFFE_MEAN_BGR).reshape(1, 3, 1, 1))])
            else:
                x = node("Div", [x, const(255.0)])
                x = node("Sub", [x, const(np.array(_TORCH_MEAN_RGB).reshape(1, 3, 1, 1))])
                x = node("Div", [x, const(np.array(_TORCH_STD_RGB).reshape(1, 3, 1, 1))])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            if layer.padding != "same" or tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
                raise OnnxUnsupported(f"layer {layer.name}: only stride-1 'same' convolutions are translated")
            kh, kw = kernel.shape[:2]
            x = node("Conv", [x, const(kernel.transpose(3, 2, 0, 1)), const(bias)], kernel_shape=[kh, kw],
                     pads=[kh // 2, kw // 2, kh // 2, kw // 2])
            x = _activation(layer, x, node)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            if layer.padding != "valid":
                raise OnnxUnsupported(f"layer {layer.name}: only 'valid' max pooling is translated")
            x = node("MaxPool", [x], kernel_shape=list(layer.pool_size), strides=list(layer.strides))
        elif isinstance(layer, keras.layers.Flatten):
            x = node("Transpose", [x], perm=[0, 2, 3, 1])  # Keras flattens NHWC
            x = node("Flatten", [x], axis=1)
            layout = "ND"
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            x = node("Add", [node("MatMul", [x, const(kernel)]), const(bias)])
            x = _activation(layer, x, node)
            dimension = kernel.shape[1]
        elif isinstance(layer, GeMPooling):
            x = node("Max", [x, const(layer.epsilon)])
            x = node("Pow", [x, const(layer.p)])
            x = node("ReduceMean", [x], axes=[2, 3], keepdims=0)
            x = node("Pow", [x, const(1.0 / layer.p)])
            layout = "ND"
        elif isinstance(layer, keras.layers.GlobalMaxPooling2D):
            x = node("Flatten", [node("GlobalMaxPool", [x])], axis=1)
            layout = "ND"
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            x = node("Flatten", [node("GlobalAveragePool", [x])], axis=1)
            layout = "ND"
        elif isinstance(layer, L2Normalize):
            norm = node("Sqrt", [node("ReduceSumSquare", [x], axes=[1], keepdims=1)])
            x = node("Div", [x, node("Max", [norm, const(layer.epsilon)])])
        else:
            raise OnnxUnsupported(
                f"layer {layer.name} ({type(layer).__name__}) has no ONNX translation here; use CBIR_EMBEDDER_BACKEND=keras"
            )
    height, width = model.inputs[0].shape[1:3]
    if layout == "NCHW" and len(model.outputs[0].shape) == 4:  # a trunk: its feature maps, NHWC as Keras gives them
        nodes.append(helper.make_node("Transpose", [x], [MAPS], perm=[0, 2, 3, 1]))
        output = helper.make_tensor_value_info(MAPS, TensorProto.FLOAT, ["N", "h", "w", int(model.outputs[0].shape[-1])])
    elif layout == "ND":
        nodes.append(helper.make_node("Identity", [x], [VECTORS]))
        dimension = dimension or model.outputs[0].shape[-1]
        output = helper.make_tensor_value_info(VECTORS, TensorProto.FLOAT, ["N", int(dimension)])
    else:
        raise OnnxUnsupported("the model does not end in a pooled or dense vector or in feature maps")
    graph = helper.make_graph(
        nodes, model.name,
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", height or "H", width or "W", 3])],
        [output],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cbir",
                                   ir_version=IR_VERSION)
    onnx.checker.check_model(onnx_model)
    return onnx_model.SerializeToString()


def _activation(layer, x: str, node) -> str:
    name = getattr(layer.activation, "__name__", "")
    if name == "relu":
        return node("Relu", [x])
    if name == "linear":
        return x
    raise OnnxUnsupported(f"layer {layer.name}: activation {name!r} has no ONNX translation here")


def providers() -> list[str]:
    """ONNX Runtime providers to use: CUDA first when this onnxruntime build and host have it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRunner:
    """The exported model through ONNX Runtime (`(N, H, W, 3) uint8 -> vectors or maps`); safe to call from any
    thread."""

    def __init__(self, serialized: bytes, *, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: on a host whose cores are shared (other
        # replicas, the gRPC threads decoding images) spinning burns the CPU the model needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(serialized, sess_options=options, providers=providers())
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(batch, dtype=np.uint8)})[0]


def check_batch(count: int = 4) -> np.ndarray:
    """Fixed pixels for the equivalence check: a gradient, a checkerboard, seeded noise, a flat image."""
    rng = np.random.default_rng(20261124)
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    images = [
        np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (224, 1)), np.tile(ramp[:, None], (1, 224))], -1),
        np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((28, 28)))[..., None].repeat(3, -1),
        rng.integers(0, 256, (224, 224, 3)),
        np.full((224, 224, 3), 128),
    ]
    return np.stack(images[:count]).astype(np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def comparable(output: np.ndarray) -> np.ndarray:
    """What the equivalence check compares: vectors as they are, a trunk's feature maps GeM-pooled (the
    descriptor they become)."""
    output = np.asarray(output, np.float32)
    if output.ndim != 4:
        return output
    return np.stack([pool(fmap, "gem", 3.0) for fmap in output])


def quantize_int8(serialized: bytes, calibration: Sequence[np.ndarray]) -> bytes:
    """The float32 graph `serialized` with static int8 quantization (ONNX Runtime's `quantize_static`): int8
    weights per output channel, uint8 activations whose ranges are the min and max seen over `calibration`
    (uint8 images of the shapes the model will be given, run one at a time); QDQ format, which ONNX Runtime
    fuses into integer convolutions (VNNI / AMX-INT8 where the CPU has them)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("int8 quantization needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {"pixels": np.ascontiguousarray(image[None], dtype=np.uint8)}

    with tempfile.TemporaryDirectory(prefix="cbir-int8-") as folder:
        source, target = Path(folder, "float32.onnx"), Path(folder, "int8.onnx")
        source.write_bytes(serialized)
        with _without_preprocessing_advice():
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return target.read_bytes()


@contextlib.contextmanager
def _without_preprocessing_advice():
    """quantize_static advises, on the root logger, to run `quant_pre_process` first: it brings symbolic shape
    inference and graph fusions for transformer-like graphs; this plain Conv/ReLU graph was measured without it
    (BENCHMARKS.md), so the advice would only puzzle whoever reads the embedder's log."""
    def advice(record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Please consider") and "pre-processing" in message)

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def cached_int8(serialized: bytes, calibration: Sequence[np.ndarray], cache_dir: Path | None) -> bytes:
    """`quantize_int8(serialized, calibration)`, kept in `cache_dir` under a hash of both: a restart with the same
    weights and calibration photos loads it instead of calibrating again (tens of seconds)."""
    digest = hashlib.sha256(serialized)
    for image in calibration:
        digest.update(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    path = Path(cache_dir).expanduser() / "onnx" / f"int8-{digest.hexdigest()[:20]}.onnx" if cache_dir else None
    if path is not None and path.is_file():
        log.info("int8 model from the cache: %s", path)
        return path.read_bytes()
    start = time.perf_counter()
    quantized = quantize_int8(serialized, calibration)
    log.info("int8 model calibrated on %d images in %.1f s", len(calibration), time.perf_counter() - start)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(quantized)
        partial.replace(path)
    return quantized


def checked_runner(model, *, reference, pixels: np.ndarray | None = None, precision: str = "float32",
                   calibration: Sequence[np.ndarray] = (), cache_dir: Path | None = None) -> OnnxRunner:
    """An `OnnxRunner` for `model`, checked to give the vectors of `reference` (the Keras float32 runner of the
    same model): every vector of the check pixels (default: `check_batch()`) must have cosine >= MIN_COSINE with
    Keras's (a trunk's maps are compared pooled, `comparable`). With `precision="int8"` the graph is quantized
    on the `calibration` images first (`cached_int8`), checked on the first CHECK_PHOTOS of them, and the bar is
    MIN_COSINE_INT8.

    Raises `OnnxUnsupported` for a model it cannot translate and RuntimeError when the vectors differ.
    """
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"the onnx backend's precision must be one of {', '.join(ONNX_PRECISIONS)}, not {precision!r}")
    start = time.perf_counter()
    serialized = export_onnx(model)
    if precision == "int8":
        serialized = cached_int8(serialized, calibration, cache_dir)
    runner = OnnxRunner(serialized)
    if pixels is not None:
        checks = [pixels]
    elif precision == "int8":  # photos: int8 ranges fit photos, not the synthetic noise and checkerboard
        checks = [image[None] for image in calibration[:CHECK_PHOTOS]]
    else:
        checks = [check_batch()]
    expected = np.concatenate([comparable(reference(batch)) for batch in checks])
    got = np.concatenate([comparable(runner(batch)) for batch in checks])
    bar = MIN_COSINE_INT8 if precision == "int8" else MIN_COSINE
    worst = float(cosines(expected, got).min()) if np.abs(expected).sum() else 1.0
    if got.shape != expected.shape or worst < bar:
        raise RuntimeError(
            f"the ONNX model's {precision} vectors differ from Keras's (lowest cosine {worst:.6f} < {bar}); "
            f"use CBIR_EMBEDDER_BACKEND=keras"
        )
    log.info("embedder backend: ONNX Runtime %s, %s, exported and checked against Keras in %.1f s (lowest cosine "
             "%.7f)", runner.providers, precision, time.perf_counter() - start, worst)
    return runner
