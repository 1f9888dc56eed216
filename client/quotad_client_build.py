"""PEP 517 build backend of quotad-client: setuptools, after generating the contract's stubs.

The contract, `protos/quotad/v1/quotad.proto`, lives beside client/ in the repository; each
build writes `quotad_contract/v1/quotad_pb2*.py(i)` anew from it. A build with no protos/
beside it (from an sdist, which carries the stubs) uses the stubs it has. The server's
backend makes the same files with quotad.protogen, and tests/test_stubs.py compares them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (re-exported hooks)
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

CLIENT = Path(__file__).resolve().parent
PROTO_ROOT = CLIENT.parent / "protos"
CONTRACT = "quotad/v1/quotad.proto"
OUT_DIR = CLIENT / "quotad_contract" / "v1"
PROTOC_PACKAGE = "quotad.v1"
CONTRACT_PACKAGE = "quotad_contract.v1"


def generate_contract_stubs() -> None:
    """quotad_pb2.py, quotad_pb2.pyi and quotad_pb2_grpc.py into quotad_contract/v1, with the
    one import of the gRPC module rewritten from protoc's module name to the contract package."""
    if not (PROTO_ROOT / CONTRACT).is_file():
        return
    import google.rpc.status_pb2
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    google_apis = Path(google.rpc.status_pb2.__file__).parent.parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        exit_code = protoc.main([
            "grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--proto_path={well_known}",
            f"--proto_path={google_apis}", f"--python_out={scratch}", f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}", str(PROTO_ROOT / CONTRACT)])
        if exit_code != 0:
            raise RuntimeError(f"protoc failed ({exit_code}) on {PROTO_ROOT / CONTRACT}")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        stem = CONTRACT.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            generated = Path(scratch) / f"{stem}{suffix}"
            text = generated.read_text().replace(
                f"from {PROTOC_PACKAGE} import", f"from {CONTRACT_PACKAGE} import")
            (OUT_DIR / generated.name).write_text(text)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    generate_contract_stubs()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    generate_contract_stubs()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    generate_contract_stubs()
    return _setuptools.build_sdist(sdist_directory, config_settings)
