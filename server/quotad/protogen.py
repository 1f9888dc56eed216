"""Generates the Python gRPC stubs from protos/ with grpcio-tools (used by the build)."""

from __future__ import annotations

from pathlib import Path

PROTO_FILES = ("quotad/v1/quotad.proto",)


def generate_stubs(proto_root: Path, out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir."""
    import google.rpc.status_pb2
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    google_apis = Path(google.rpc.status_pb2.__file__).parent.parent.parent  # google/rpc/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--proto_path={google_apis}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_root / proto),
        ]
        exit_code = protoc.main(args)
        if exit_code != 0:
            raise RuntimeError(f"protoc failed ({exit_code}) on {proto_root / proto}")
    written = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = out_dir / f"{stem}{suffix}"
            assert path.exists(), path
            written.append(path)
    return written
