"""Refusals as data: one enum of the reasons, in the proto and in Python."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotad_contract.errors import ERROR_DOMAIN, ErrorReason
from quotad_contract.v1 import quotad_pb2 as pb
from server_process import ROOT, ServerProcess

SERVER_SOURCE = ROOT / "server" / "quotad"
WITH_REASON = ("FailedPrecondition", "ResourceExhausted")


def test_the_reason_enum_names_the_protos_values_in_order():
    assert pb.ErrorReason.Name(0) == "ERROR_REASON_UNSPECIFIED"
    assert [(reason.name, pb.ErrorReason.Value(reason.name)) for reason in ErrorReason] == [
        (name, number) for name, number in pb.ErrorReason.items() if number != 0]
    assert all(reason == reason.name for reason in ErrorReason)


def _reason_arguments(path: Path) -> list[ast.expr]:
    """The first argument of every FailedPrecondition(...) and ResourceExhausted(...) call."""
    return [node.args[0] if node.args else node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in WITH_REASON]


def test_every_reason_the_server_can_send_is_in_the_enum():
    """Each refusal with a reason names an ErrorReason member, or looks one up in a mapping
    of the module whose values are all members; never a string."""
    found: set[ErrorReason] = set()
    for path in sorted(SERVER_SOURCE.rglob("*.py")):
        module = None
        for argument in _reason_arguments(path):
            where = f"{path.relative_to(ROOT)}:{argument.lineno}"
            if (isinstance(argument, ast.Attribute) and isinstance(argument.value, ast.Name)
                    and argument.value.id == "ErrorReason"):
                found.add(ErrorReason[argument.attr])
            elif isinstance(argument, ast.Subscript) and isinstance(argument.value, ast.Name):
                module = module or importlib.import_module(
                    ".".join(path.relative_to(ROOT / "server").with_suffix("").parts))
                mapping = getattr(module, argument.value.id)
                assert all(isinstance(value, ErrorReason) for value in mapping.values()), where
                found.update(mapping.values())
            else:
                pytest.fail(f"{where}: a reason that is not an ErrorReason member")
    assert found == set(ErrorReason)


def test_a_reason_over_the_wire_is_the_name_of_a_proto_enum_value(tmp_path):
    """What a client in another language matches: ErrorInfo.reason == ErrorReason.Name(...)."""
    from quotad_contract.v1 import quotad_pb2_grpc

    server = ServerProcess(tmp_path / "data")
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                quotad_pb2_grpc.QuotaServiceStub(channel).GetUsage(
                    pb.GetUsageRequest(user_id="nobody"), timeout=10)
    finally:
        server.close()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    (detail,) = rpc_status.from_call(refused.value).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == (pb.ErrorReason.Name(pb.NO_PLAN), ERROR_DOMAIN)
