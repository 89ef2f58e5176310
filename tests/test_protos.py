"""The committed gRPC stubs are exactly what scripts/gen_protos.py makes from protos/."""

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto_files(tmp_path):
    """Fails when a .proto changed without regenerating, or a stub was edited by hand."""
    # In a subprocess: protoc in-process crashes once TensorFlow's protobuf is loaded by other tests.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted((tmp_path / "cbir" / "v1").glob("*_pb2*.py*"))
    assert generated, "no stubs generated"
    committed_dir = ROOT / "cbir" / "v1"
    names = {path.name for path in generated}
    committed = {path.name for path in committed_dir.glob("*_pb2*.py*")}
    assert names == committed, f"stub files differ: only generated {names - committed}, only committed {committed - names}"
    drifted = [name for name in sorted(names) if not filecmp.cmp(tmp_path / "cbir" / "v1" / name, committed_dir / name, shallow=False)]
    assert not drifted, f"stubs out of date: {drifted}; run `python scripts/gen_protos.py`"


def test_every_service_is_in_package_cbir_v1():
    """All RPC services live in one API package, as clients and reflection expect."""
    from cbir.v1 import embedder_pb2, gateway_pb2, indexer_pb2

    services = {
        name: descriptor.full_name
        for module in (embedder_pb2, indexer_pb2, gateway_pb2)
        for name, descriptor in module.DESCRIPTOR.services_by_name.items()
    }
    assert services == {"Embedder": "cbir.v1.Embedder", "Indexer": "cbir.v1.Indexer", "Gateway": "cbir.v1.Gateway"}
