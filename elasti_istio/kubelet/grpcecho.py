"""``elasti.echo.v1.Echo``: the gRPC echo service of the generic app, its messages and a client stub.

The schema is built in code and registered in the default descriptor pool, so the server's
reflection describes it to ``grpcurl``-style clients and no generated code is needed on either side.
As a ``.proto`` it reads::

    syntax = "proto3";
    package elasti.echo.v1;

    message EchoRequest {
      string message = 1;
      int32 count = 2;           // ServerStream: how many responses (0: one)
      int32 delay_ms = 3;        // pause before each response
      int32 status_code = 4;     // non-zero: the call ends with this gRPC status
      string status_message = 5; // its details (default: "requested status NAME")
      int32 payload_size = 6;    // bytes of padding in each response's payload
    }
    message EchoResponse {
      string message = 1;
      string pod = 2;
      string namespace = 3;
      string ip = 4;
      int32 port = 5;
      int32 index = 6;           // 0-based position of the response in its call
      string container = 7;
      int32 received = 8;        // requests received on the call so far
      bytes payload = 9;
      map<string, string> metadata = 10;  // the request's metadata (repeated keys joined by ",")
    }
    message SeenRequest { string method = 1; }  // "Unary" or "/elasti.echo.v1.Echo/Unary"; "": all
    message SeenResponse { string method = 1; int64 count = 2; int64 inflight = 3; int64 cancelled = 4; }

    service Echo {
      rpc Unary(EchoRequest) returns (EchoResponse);
      rpc ServerStream(EchoRequest) returns (stream EchoResponse);
      rpc ClientStream(stream EchoRequest) returns (EchoResponse);
      rpc Bidi(stream EchoRequest) returns (stream EchoResponse);
      rpc Seen(SeenRequest) returns (SeenResponse);
    }
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "elasti.echo.v1"
SERVICE = f"{PACKAGE}.Echo"
FILE_NAME = "elasti/echo/v1/echo.proto"
# The echo methods (Seen reports on them and is not counted itself).
ECHO_METHODS = ("Unary", "ServerStream", "ClientStream", "Bidi")
METHODS = (*ECHO_METHODS, "Seen")

# Initial metadata of every call: which pod answered.
POD_NAME = "x-pod-name"
POD_NAMESPACE = "x-pod-namespace"
POD_IP = "x-pod-ip"
# Trailing metadata of every call: ``x-echo-trailer: <method>``, then every request key with the prefix.
TRAILER = "x-echo-trailer"
ECHO_PREFIX = "x-echo-"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT32, _INT64, _BYTES, _MESSAGE = _F.TYPE_STRING, _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_BYTES, _F.TYPE_MESSAGE


def _message(
    file: descriptor_pb2.FileDescriptorProto | descriptor_pb2.DescriptorProto,
    name: str,
    fields: list[tuple[str, int, int]],
) -> descriptor_pb2.DescriptorProto:
    msg = file.message_type.add() if isinstance(file, descriptor_pb2.FileDescriptorProto) else file.nested_type.add()
    msg.name = name
    for fname, number, ftype in fields:
        msg.field.add(name=fname, json_name=_json_name(fname), number=number, type=ftype, label=_F.LABEL_OPTIONAL)
    return msg


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """The schema of the echo service as a ``FileDescriptorProto`` (what reflection serves)."""
    f = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    _message(
        f,
        "EchoRequest",
        [
            ("message", 1, _STRING),
            ("count", 2, _INT32),
            ("delay_ms", 3, _INT32),
            ("status_code", 4, _INT32),
            ("status_message", 5, _STRING),
            ("payload_size", 6, _INT32),
        ],
    )
    resp = _message(
        f,
        "EchoResponse",
        [
            ("message", 1, _STRING),
            ("pod", 2, _STRING),
            ("namespace", 3, _STRING),
            ("ip", 4, _STRING),
            ("port", 5, _INT32),
            ("index", 6, _INT32),
            ("container", 7, _STRING),
            ("received", 8, _INT32),
            ("payload", 9, _BYTES),
        ],
    )
    entry = _message(resp, "MetadataEntry", [("key", 1, _STRING), ("value", 2, _STRING)])
    entry.options.map_entry = True
    resp.field.add(
        name="metadata",
        json_name="metadata",
        number=10,
        type=_MESSAGE,
        label=_F.LABEL_REPEATED,
        type_name=f".{PACKAGE}.EchoResponse.MetadataEntry",
    )
    _message(f, "SeenRequest", [("method", 1, _STRING)])
    _message(
        f,
        "SeenResponse",
        [("method", 1, _STRING), ("count", 2, _INT64), ("inflight", 3, _INT64), ("cancelled", 4, _INT64)],
    )
    service = f.service.add(name="Echo")
    req, res = f".{PACKAGE}.EchoRequest", f".{PACKAGE}.EchoResponse"
    for name, client_streaming, server_streaming in (
        ("Unary", False, False),
        ("ServerStream", False, True),
        ("ClientStream", True, False),
        ("Bidi", True, True),
    ):
        service.method.add(
            name=name,
            input_type=req,
            output_type=res,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    service.method.add(name="Seen", input_type=f".{PACKAGE}.SeenRequest", output_type=f".{PACKAGE}.SeenResponse")
    return f


def _register() -> Any:
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(FILE_NAME)
    except KeyError:
        return pool.AddSerializedFile(file_descriptor_proto().SerializeToString())


FILE = _register()
EchoRequest: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoRequest"])
EchoResponse: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoResponse"])
SeenRequest: Any = message_factory.GetMessageClass(FILE.message_types_by_name["SeenRequest"])
SeenResponse: Any = message_factory.GetMessageClass(FILE.message_types_by_name["SeenResponse"])


def method_path(name: str) -> str:
    """``Unary`` → ``/elasti.echo.v1.Echo/Unary`` (a full path is returned as it is)."""
    return name if name.startswith("/") else f"/{SERVICE}/{name}"


class EchoStub:
    """Client of ``elasti.echo.v1.Echo`` on a ``grpc.Channel`` or a ``grpc.aio.Channel``.

    Each attribute is the channel's multi-callable for the method, so calls take ``timeout``,
    ``metadata`` and the rest as usual, and with an aio channel they are awaited or iterated.
    """

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        def codec(req: Any, res: Any) -> dict[str, Any]:
            return {"request_serializer": req.SerializeToString, "response_deserializer": res.FromString}

        echo = codec(EchoRequest, EchoResponse)
        self.Unary: Any = channel.unary_unary(method_path("Unary"), **echo)
        self.ServerStream: Any = channel.unary_stream(method_path("ServerStream"), **echo)
        self.ClientStream: Any = channel.stream_unary(method_path("ClientStream"), **echo)
        self.Bidi: Any = channel.stream_stream(method_path("Bidi"), **echo)
        self.Seen: Any = channel.unary_unary(method_path("Seen"), **codec(SeenRequest, SeenResponse))


def stub(channel: grpc.Channel | grpc.aio.Channel) -> EchoStub:
    return EchoStub(channel)
