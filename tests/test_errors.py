"""Refusals as data: one reason enum, one table from code to gRPC, HTTP and client answers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

import quotad_client as qc
import quotad.server  # noqa: F401  (imports every module that defines a refusal)
from quotad.api.gate import Unavailable
from quotad.api.service import status_proto_of
from quotad.core.errors import (
    FailedPrecondition, FieldViolation, InvalidArgument, QuotaError, Refusal,
)
from quotad.engine.writer import WriterStopped
from quotad_contract.errors import ERROR_DOMAIN, ERRORS, ErrorReason
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
    # refusals that carry their one reason themselves (SlotsMoving)
    found |= {cls.reason for cls in _refusal_classes() if cls.reason is not None}
    assert found == set(ErrorReason)


def _refusal_classes() -> list[type[Refusal]]:
    classes, pending = [], [Refusal]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def test_every_refusal_class_names_a_code_of_the_table():
    concrete = [cls for cls in _refusal_classes() if cls not in (Refusal, QuotaError)]
    assert {WriterStopped, Unavailable, FailedPrecondition} <= set(concrete)
    for cls in concrete:
        assert cls.code in ERRORS and cls.code != "INTERNAL", cls
    assert (WriterStopped.code, Unavailable.code) == ("UNAVAILABLE", "UNAVAILABLE")
    assert ERRORS["UNAVAILABLE"].http_status == 503


def test_every_code_of_the_table_is_a_grpc_code_and_a_client_exception():
    for kind in ERRORS.values():
        assert grpc.StatusCode[kind.code].value[0] == code_pb2.Code.Value(kind.code)
        assert 400 <= kind.http_status <= 599
        client_error = getattr(qc, kind.client_error)
        assert issubclass(client_error, qc.QuotadError)
        assert type(qc.error_from_status(grpc.StatusCode[kind.code], "m")) is client_error


def _one_of_each() -> list[Refusal]:
    refusals: list[Refusal] = []
    for cls in _refusal_classes():
        if cls in (Refusal, QuotaError):
            continue
        if cls is InvalidArgument:
            refusals.append(cls([FieldViolation("user_id", "must be 1 to 256 bytes, got 0")]))
        elif cls.__name__ in WITH_REASON:
            refusals.append(cls(ErrorReason.TOO_MANY_HOLDS, "the reason"))
        else:
            refusals.append(cls("the message"))
    return refusals


@pytest.mark.parametrize("refusal", _one_of_each(), ids=lambda refusal: type(refusal).__name__)
def test_a_refusal_reaches_the_client_as_the_tables_exception_with_its_details(refusal):
    status = status_proto_of(refusal)
    assert code_pb2.Code.Name(status.code) == refusal.code
    code = grpc.StatusCode[refusal.code]
    error = qc.error_from_status(code, status.message, status)
    assert type(error).__name__ == ERRORS[refusal.code].client_error
    assert error.message == str(refusal)
    if refusal.reason is not None:
        assert error.reason == refusal.reason
    if isinstance(refusal, InvalidArgument):
        assert error.field_violations == [("user_id", "must be 1 to 256 bytes, got 0")]


def test_anything_else_is_internal_without_details():
    status = status_proto_of(KeyError("a fault"))
    assert (status.code, list(status.details)) == (code_pb2.INTERNAL, [])


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
