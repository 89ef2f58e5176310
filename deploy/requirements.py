"""Print the pinned requirements one service's container image needs, taken from pyproject.toml.

    python deploy/requirements.py indexer [--pyproject pyproject.toml] [--tensorflow-extras and-cuda]

pyproject.toml stays the one place where versions are pinned (`pip install -e .` installs all of
them, for the demo and the tests). Each image installs only the part its service imports, then
cbir itself with `--no-deps`: TensorFlow (~1.5 GB installed) goes only into the embedder image,
Gradio only into the UI's. tests/test_deploy.py checks that every module a service imports at
run time comes from the packages listed here for it, and that every name here is in pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# What every gRPC service and the CLI import (grpc_server, settings, metrics, the `cbir` command).
COMMON = [
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "prometheus-client",
    "click",
    "pydantic",
    "pydantic-settings",
]

SERVICES: dict[str, list[str]] = {
    # VGG-16 and the local features (OpenCV's SIFT); also everything `cbir index build` needs, so the
    # image can build in-process too. onnx, onnxruntime: CBIR_EMBEDDER_BACKEND=onnx and its int8 precision.
    "embedder": COMMON + ["tensorflow", "keras", "h5py", "numpy", "pillow", "annoy", "faiss-cpu", "tqdm", "urllib3",
                          "opencv-python-headless", "onnx", "onnxruntime"],
    # The Annoy or faiss bundle (faiss is imported only for a faiss bundle) and geometric verification
    # (OpenCV's RANSAC on the stored local features); and `cbir index build --embedder ...` (the
    # one-shot build job), which embeds through the embedder service and decodes images with Pillow
    # only to check them.
    # pymilvus: a bundle whose index is a Milvus collection (--index milvus), imported only for one.
    "indexer": COMMON + ["annoy", "faiss-cpu", "numpy", "pillow", "tqdm", "urllib3", "opencv-python-headless",
                         "pymilvus"],
    # SearchByUrl downloads images with cbir.download (urllib3).
    "gateway": COMMON + ["urllib3"],
    "ui": COMMON + ["gradio", "pillow"],
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0])


def pinned(pyproject: Path) -> dict[str, str]:
    """name -> requirement line of pyproject's [project] dependencies and optional extras (the same pins the
    tests ran with; an image takes an extra's package only where SERVICES names it)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += [line for line in extra if requirement_name(line) != "cbir"]
    table = {}
    for line in lines:
        table.setdefault(requirement_name(line), line)  # the main dependencies first
    return table


def requirements(service: str, pyproject: Path, tensorflow_extras: str = "") -> list[str]:
    table = pinned(pyproject)
    missing = [name for name in SERVICES[service] if normalize(name) not in table]
    if missing:
        raise SystemExit(f"{pyproject} does not list {', '.join(missing)} (needed by the {service} image)")
    lines = [table[normalize(name)] for name in SERVICES[service]]
    if tensorflow_extras:
        # TensorFlow's GPU build is the same package with an extra: tensorflow[and-cuda]==X.
        lines = [re.sub(r"^tensorflow(?=[=<>~!])", f"tensorflow[{tensorflow_extras}]", line) for line in lines]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--tensorflow-extras", default="", help="e.g. and-cuda for TensorFlow's GPU build")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{line}\n" for line in requirements(args.service, args.pyproject, args.tensorflow_extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
