"""Regenerate the Python gRPC stubs in cbir/v1/ from protos/cbir/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]   (DIR defaults to the repository root)
tests/test_protos.py runs this into a temporary folder and fails when the committed stubs differ.
"""

import argparse
import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted(PROTO_ROOT.glob("cbir/v1/*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out / "cbir" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    out = parser.parse_args().out
    for path in generate(out):
        print(path.relative_to(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
