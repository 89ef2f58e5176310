"""Generated gRPC/protobuf code for package cbir.v1. Do not edit: run scripts/gen_protos.py."""
