"""Inside the sandbox: one unary gRPC call with grpcio, as an app would make it.

Usage: grpc_client.py HOST:PORT plain|tls NAME. The request is a protobuf message with NAME
in field 1 (encoded by hand: no generated stubs needed); prints the response's bytes in hex,
or "failed" and the status code's name.
With tls, the channel trusts grpcio's default roots, which tapui points at its bundle
(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)."""

import sys

import grpc

target, mode, name = sys.argv[1], sys.argv[2], sys.argv[3].encode()
request = b"\x0a" + bytes([len(name)]) + name  # field 1, length-delimited
if mode == "tls":
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
else:
    channel = grpc.insecure_channel(target)
with channel:
    say = channel.unary_unary("/echo.Echo/Say")  # bytes in, bytes out
    try:
        print(say(request, timeout=20).hex())
    except grpc.RpcError as exc:
        print("failed", exc.code().name)
