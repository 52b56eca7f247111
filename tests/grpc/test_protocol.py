"""service/grpc/oip_pb2.py is what oip.proto compiles to, and its messages are the Open
Inference Protocol's on the wire: every field Triton's client writes is read here with the
same number and type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from service.grpc import oip_pb2
from tests.conftest import ROOT

PROTO = ROOT / "service" / "grpc" / "oip.proto"


def compiled(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "oip.desc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--descriptor_set_out={out}",
            PROTO.name,
        ],
        check=True,
    )
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in file.message_type:  # protoc fills in the JSON names; the module omits them
        forget_json_names(message)
    return file


def forget_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        forget_json_names(nested)


def test_the_generated_module_is_the_proto_compiled(tmp_path: Path) -> None:
    generated = descriptor_pb2.FileDescriptorProto()
    oip_pb2.DESCRIPTOR.CopyToProto(generated)
    assert generated == compiled(tmp_path), (
        "service/grpc/oip_pb2.py is stale: regenerate it with the command in oip.proto"
    )


def fields(message: object) -> dict[str, tuple[int, int, str]]:
    """Each field by name: its number, wire type and, for messages, the type's short name."""
    return {
        field.name: (
            field.number,
            field.type,
            field.message_type.name if field.message_type else "",
        )
        for field in message.fields  # type: ignore[attr-defined]
    }


def test_every_message_reads_what_tritons_client_writes() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    checked = 0
    for name, ours in oip_pb2.DESCRIPTOR.message_types_by_name.items():
        theirs = triton.DESCRIPTOR.message_types_by_name[name]
        pending = [(ours, theirs)]
        while pending:
            mine, other = pending.pop()
            assert fields(mine) == fields(other), f"{mine.full_name} differs from {other.full_name}"
            nested = {n.name: n for n in other.nested_types}
            pending += [(n, nested[n.name]) for n in mine.nested_types]
            checked += 1
    assert checked >= 20
