"""Generates the Python gRPC stubs from protos/ with grpcio-tools (used by the build).

etcd's own API (protos/etcd/, trimmed from etcd's published rpc.proto and kv.proto) is
generated the same way, into the server's quotad.cluster.etcdpb.

The public stubs belong to the contract package, `quotad_contract.v1`, which server and client both
import. protoc names Python modules after the .proto path (`quotad/v1/quotad.proto` ->
`quotad.v1`), so the one import the gRPC module makes of its messages is rewritten to the
contract package; the proto package, its file name and every message name stay as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

STUBS: dict[str, tuple[str, bool]] = {
    "quotad/v1/quotad.proto": ("client/quotad_contract/v1", True),
    "quotad/internal/log.proto": ("server/quotad/storage", False),
    "quotad/internal/snapshot.proto": ("server/quotad/storage", False),
    "etcd/kv.proto": ("server/quotad/cluster/etcdpb", False),
    "etcd/rpc.proto": ("server/quotad/cluster/etcdpb", True),
}
"""Each proto -> (the folder, from the repository's root, its modules go to; gRPC services?).
The contract's stubs go to the contract package; the log's records and snapshots are the
server's own, and so is its etcd client's part of etcd's API."""
PROTOC_PACKAGE = "quotad.v1"
CONTRACT_PACKAGE = "quotad_contract.v1"
IMPORTS = {f"from {PROTOC_PACKAGE} import": f"from {CONTRACT_PACKAGE} import",
           "from etcd import": "from quotad.cluster.etcdpb import"}
"""protoc's module names (after the .proto paths) -> the packages the modules live in."""


def generate_stubs(proto_root: Path, out_root: Path) -> list[Path]:
    """Writes *_pb2.py and *_pb2.pyi (and *_pb2_grpc.py for a proto with services) of every
    proto into its folder under out_root (the repository, or a scratch folder to compare)."""
    import google.rpc.status_pb2
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    google_apis = Path(google.rpc.status_pb2.__file__).parent.parent.parent  # google/rpc/*.proto
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        for proto, (folder, services) in STUBS.items():
            out_dir = out_root / folder
            out_dir.mkdir(parents=True, exist_ok=True)
            args = [
                "grpc_tools.protoc",
                f"--proto_path={proto_root}",
                f"--proto_path={well_known}",
                f"--proto_path={google_apis}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                *([f"--grpc_python_out={scratch}"] if services else []),
                str(proto_root / proto),
            ]
            exit_code = protoc.main(args)
            if exit_code != 0:
                raise RuntimeError(f"protoc failed ({exit_code}) on {proto_root / proto}")
            stem = proto.removesuffix(".proto")
            for suffix in ("_pb2.py", "_pb2.pyi", *(["_pb2_grpc.py"] if services else [])):
                generated = Path(scratch) / f"{stem}{suffix}"
                assert generated.exists(), generated
                text = generated.read_text()
                for protoc_import, package_import in IMPORTS.items():
                    text = text.replace(protoc_import, package_import)
                path = out_dir / generated.name
                path.write_text(text)
                written.append(path)
    return written
