"""`tandem client`: talk to a running tandem server over gRPC, streaming to the terminal.

    tandem client [--target HOST:PORT] [--api-key-env VAR] [--tls | --tls-ca PEM]
                  (--prompt TEXT | --chat TEXT | --health) [--max-tokens N]
                  [--temperature T] [--timeout S] [--json]

--prompt completes raw text (Generate); --chat sends one user message (Chat) and prints
the reasoning, then the answer, each under its own heading; --health exits 0 only when
the server's engine answers (usable as an exec probe). --json prints one JSON
object per streamed chunk instead. The API key is read from an environment variable
(default TANDEM_API_KEY), never from the command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tandem.cluster.api import DEFAULT_GRPC_PORT
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.client import TandemClient

DEFAULT_API_KEY_ENV = "TANDEM_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `client` subcommand to the `tandem` parser."""
    p = subparsers.add_parser("client", help="send a prompt or chat message to a server")
    p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help="HOST:PORT")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help=f"environment variable holding the API key (default {DEFAULT_API_KEY_ENV}, "
        "used when set)",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true", help="TLS, verified against the system's CAs")
    tls.add_argument("--tls-ca", default=None, metavar="PEM", help="TLS, trusting only this CA")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to complete (Generate)")
    what.add_argument("--chat", help="a user message (Chat, harmony)")
    what.add_argument("--health", action="store_true", help="exit 0 if the server is serving")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per chunk")
    p.set_defaults(run=run)
    return p


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_env is None:
        return os.environ.get(DEFAULT_API_KEY_ENV) or None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise SystemExit(f"tandem client: environment variable {args.api_key_env} is not set")
    return key


def _print_json(message: Message, out: TextIO) -> None:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    print(json.dumps(data), file=out, flush=True)


def _summary(chunk: pb.GenerateChunk | pb.ChatChunk) -> str:
    reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
    u, t = chunk.usage, chunk.timings
    return (
        f"[{reason}; {u.prompt_tokens} prompt ({u.cached_tokens} cached) + "
        f"{u.completion_tokens} completion tokens; ttft {t.ttft_s * 1000:.1f} ms, "
        f"{t.per_token_s * 1000:.1f} ms/token]"
    )


def _stream_generate(client: TandemClient, args: argparse.Namespace, out: TextIO) -> None:
    chunks = client.generate(
        args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, timeout=args.timeout
    )
    for chunk in chunks:
        if args.json:
            _print_json(chunk, out)
            continue
        print(chunk.text_delta, end="", file=out, flush=True)
        if chunk.finish_reason:
            print(file=out)
            print(_summary(chunk), file=sys.stderr, flush=True)


def _stream_chat(client: TandemClient, args: argparse.Namespace, out: TextIO) -> None:
    chunks = client.chat(
        [{"role": "user", "content": args.chat}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        timeout=args.timeout,
    )
    section = None  # the heading printed last: "reasoning" or "answer"
    for chunk in chunks:
        if args.json:
            _print_json(chunk, out)
            continue
        for name, text in (("reasoning", chunk.reasoning_delta), ("answer", chunk.content_delta)):
            if not text:
                continue
            if section != name:
                # A heading on its own line, after any text of the previous section.
                print(("\n" if section else "") + f"[{name}]", file=out)
                section = name
            print(text, end="", file=out, flush=True)
        for call in chunk.tool_calls:
            print(f"\n[tool call] {call.name}({call.arguments})", file=out, flush=True)
            section = None
        if chunk.finish_reason:
            print(file=out)
            print(_summary(chunk), file=sys.stderr, flush=True)


def _check_health(client: TandemClient, args: argparse.Namespace, out: TextIO) -> int:
    response = client.health(timeout=args.timeout or 10.0)
    if args.json:
        _print_json(response, out)
    else:
        status = pb.HealthResponse.ServingStatus.Name(response.status)
        print(status + (f": {response.detail}" if response.detail else ""), file=out)
    return 0 if response.status == pb.HealthResponse.SERVING else 1


def _root_certificates(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "tls_ca", None)
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SystemExit(f"tandem client: --tls-ca: {err.strerror}: {path}") from None


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    client = TandemClient(
        args.target,
        api_key=_api_key(args),
        root_certificates=_root_certificates(args),
        tls=getattr(args, "tls", False),
    )
    with client:
        try:
            if args.health:
                return _check_health(client, args, out)
            if args.prompt is not None:
                _stream_generate(client, args, out)
            else:
                _stream_chat(client, args, out)
        except grpc.RpcError as err:
            print(f"\ntandem client: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0
