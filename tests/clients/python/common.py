"""Shared helpers for the Python Temporal test clients used by portcullis tests.

Connection flags (see add_connection_args):
  --address HOST:PORT   (required) where to connect (the proxy or a server)
  --namespace NS        (default "default")
  --ca FILE             PEM CA bundle; enables TLS
  --cert FILE --key FILE  client certificate pair for mTLS (needs --ca)
  --server-name NAME    TLS server name (SNI / verification) override
  --api-key TOKEN       sent as `authorization: Bearer TOKEN` (temporalio's api_key)
  --grpc-compression {gzip,none}
                        request compression (default gzip, the SDK's own default)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional


def add_connection_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--address", required=True, help="HOST:PORT to connect to")
    parser.add_argument("--namespace", default="default", help="Temporal namespace")
    parser.add_argument("--ca", help="PEM CA certificate file; enables TLS")
    parser.add_argument("--cert", help="PEM client certificate file (mTLS)")
    parser.add_argument("--key", help="PEM client private key file (mTLS)")
    parser.add_argument("--server-name", dest="server_name", help="TLS server name override")
    parser.add_argument("--api-key", dest="api_key", help="bearer token (Client.connect api_key=)")
    parser.add_argument(
        "--grpc-compression",
        dest="grpc_compression",
        choices=("gzip", "none"),
        default="gzip",
        help="gRPC request compression (temporalio's default is gzip)",
    )
    return parser


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def tls_config(args: argparse.Namespace):
    """Returns a temporalio TLSConfig when --ca is given, else False (plaintext)."""
    from temporalio.service import TLSConfig

    if not getattr(args, "ca", None):
        if getattr(args, "cert", None) or getattr(args, "key", None):
            raise ValueError("--cert/--key require --ca")
        return False
    if bool(getattr(args, "cert", None)) != bool(getattr(args, "key", None)):
        raise ValueError("--cert and --key must be given together")
    return TLSConfig(
        server_root_ca_cert=_read(args.ca),
        client_cert=_read(getattr(args, "cert", None)),
        client_private_key=_read(getattr(args, "key", None)),
        domain=getattr(args, "server_name", None),
    )


async def connect(args: argparse.Namespace, **kwargs: Any):
    """Connects a temporalio Client using the connection flags."""
    from temporalio.client import Client
    from temporalio.service import GrpcCompression

    if getattr(args, "grpc_compression", "gzip") == "none":
        kwargs.setdefault("grpc_compression", GrpcCompression.NONE)
    else:
        kwargs.setdefault("grpc_compression", GrpcCompression.GZIP)
    if getattr(args, "api_key", None):
        kwargs.setdefault("api_key", args.api_key)
    return await Client.connect(
        args.address,
        namespace=args.namespace,
        tls=tls_config(args),
        **kwargs,
    )


def finish(ok: bool, payload: Optional[dict] = None) -> None:
    """Prints one JSON line {"ok": ok, ...payload} to stdout and exits hard.

    os._exit is used because the SDK's native core can abort the interpreter
    at normal shutdown after a worker ran (PyGILState_Release ...).
    """
    out = {"ok": bool(ok)}
    if payload:
        out.update({k: v for k, v in payload.items() if k != "ok"})
    try:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    finally:
        try:
            sys.stdout.flush()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(0 if ok else 1)
