"""Connects to a Pullstream server with stubs generated from ../../proto.

The stubs are generated with grpcio-tools the first time this module is
imported (and again whenever the proto changes), into ./_generated, so no
generated code is committed. Settings come from the environment, as for the
`pullstream` CLI:

  PULLSTREAM_SERVER   http://HOST:PORT (default http://127.0.0.1:50051),
                      or https://HOST:PORT for TLS
  PULLSTREAM_API_KEY  sent as `authorization: Bearer <key>` when set
  PULLSTREAM_TLS_CA   PEM file of the CA that signed the server's
                      certificate (https only; system roots otherwise)
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "pullstream" / "v1" / "pullstream.proto"
GENERATED = HERE / "_generated"


def _generate():
    """Runs protoc (bundled with grpcio-tools) when the stubs are missing or stale."""
    stamp = GENERATED / "pullstream" / "v1" / "pullstream_pb2_grpc.py"
    if stamp.exists() and stamp.stat().st_mtime >= PROTO.stat().st_mtime:
        return
    import grpc_tools
    from grpc_tools import protoc

    GENERATED.mkdir(exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={GENERATED}",
            f"--grpc_python_out={GENERATED}",
            str(PROTO),
        ]
    )
    if code != 0:
        sys.exit(f"generating stubs from {PROTO} failed (protoc exit {code})")


_generate()
sys.path.insert(0, str(GENERATED))

import grpc  # noqa: E402
from pullstream.v1 import pullstream_pb2 as pb  # noqa: E402,F401
from pullstream.v1 import pullstream_pb2_grpc as pb_grpc  # noqa: E402


def connect():
    """An EventLog stub and the call metadata (the API key, if any)."""
    channel, metadata = open_channel()
    return pb_grpc.EventLogStub(channel), metadata


def open_channel():
    """A channel to the server and the call metadata (the API key, if any).
    Use it as a context manager (`with channel:`) where calls may still be
    open when the program ends, so they are closed before the interpreter
    shuts down."""
    server = os.environ.get("PULLSTREAM_SERVER", "http://127.0.0.1:50051")
    if server.startswith("https://"):
        target = server[len("https://"):]
        ca = os.environ.get("PULLSTREAM_TLS_CA")
        roots = Path(ca).read_bytes() if ca else None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots))
    else:
        target = server[len("http://"):] if server.startswith("http://") else server
        channel = grpc.insecure_channel(target)
    key = os.environ.get("PULLSTREAM_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else []
    return channel, metadata
