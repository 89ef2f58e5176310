"""Optional ONNX Runtime inference for the embedder (`CBIR_EMBEDDER_BACKEND=onnx`).

The same Keras feature model (same weights, same preprocessing and pooling) is written out as an
ONNX graph — layer by layer, from the Keras weights, with no converter package — and run by ONNX
Runtime, which is faster on CPU than Keras/TensorFlow for VGG-16 (measured in
`benchmarks/embedder_throughput.py`; see docs/notes/performance.md). On a host with a GPU and the
`onnxruntime-gpu` package, the CUDA provider is used.

Vectors stay equivalent: at load, `checked_runner` runs a fixed check batch through both and refuses
the ONNX model unless every vector has cosine >= `MIN_COSINE` (0.9999) with Keras's. The model
fingerprint is therefore unchanged: bundles built with one backend serve queries from the other.

Supported: the single-scale models (`gem` with GeM, MAC or average pooling, and `fc1`). Anything
else (e.g. multi-scale) raises `OnnxUnsupported`, which names the layer.
Install with `pip install -e ".[onnx]"`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; newer `onnx` packages default to IR versions older runtimes refuse


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
    """The feature model `(N, 224, 224, 3) uint8 -> (N, D) float32` as a serialized ONNX model."""
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
    if layout != "ND":
        raise OnnxUnsupported("the model does not end in a pooled or dense vector")
    nodes.append(helper.make_node("Identity", [x], ["vectors"]))
    dimension = dimension or model.outputs[0].shape[-1]
    graph = helper.make_graph(
        nodes, model.name,
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", int(dimension)])],
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
    """`(N, 224, 224, 3) uint8 -> (N, D) float32` through ONNX Runtime; safe to call from any thread."""

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
        return self.session.run(["vectors"], {"pixels": np.ascontiguousarray(batch, dtype=np.uint8)})[0]


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


def checked_runner(model, *, reference, pixels: np.ndarray | None = None) -> OnnxRunner:
    """An `OnnxRunner` for `model`, checked to give the vectors of `reference` (the Keras runner of the same
    model): every vector of a fixed check batch must have cosine >= MIN_COSINE with Keras's.

    Raises `OnnxUnsupported` for a model it cannot translate and RuntimeError when the vectors differ.
    """
    start = time.perf_counter()
    runner = OnnxRunner(export_onnx(model))
    pixels = check_batch() if pixels is None else pixels
    expected = reference(pixels)
    got = runner(pixels)
    worst = float(cosines(expected, got).min()) if np.abs(expected).sum() else 1.0
    if got.shape != expected.shape or worst < MIN_COSINE:
        raise RuntimeError(
            f"the ONNX model's vectors differ from Keras's (lowest cosine {worst:.6f} < {MIN_COSINE}); "
            f"use CBIR_EMBEDDER_BACKEND=keras"
        )
    log.info("embedder backend: ONNX Runtime %s, exported and checked against Keras in %.1f s (lowest cosine %.7f)",
             runner.providers, time.perf_counter() - start, worst)
    return runner
