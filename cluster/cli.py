"""The `tandem` command line.

    tandem make-tiny-model DIR [--seed S]
    tandem generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3 | --prompts-file F [--ids])
                    --max-tokens N [--temperature T] [--top-p P] [--top-k K] [--seed S] [--json]
                    [--ep N [--ep-placement P] [--ep-dispatch D]]
    tandem serve    [--model DIR] [--config FILE] [--prefill N] [--decode M] [--host H]
                    [--grpc-port P] [--http-port P] [--tls-cert PEM --tls-key PEM] [--redis-url URL]
                    [--api-key-env VAR] [--device D]
    tandem client   [--target HOST:PORT] (--prompt TEXT | --chat TEXT | --health) ...
    tandem proto    (prints the gRPC API's .proto, for clients in other languages)
    tandem loadtest --target HOST:PORT --out DIR [workload, arrivals, bounds, SLO] ...

Every command that takes `--model` uses the embedded tiny model when none is given.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tandem.cluster import client_cli
from tandem.cluster.loadtest import cli as loadtest_cli


def _parse_ids(text: str, where: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(
            f"tandem: {where}: expected comma-separated token ids, got {text!r}"
        ) from None
    if not ids:
        raise SystemExit(f"tandem: {where}: no token ids")
    return ids


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from tandem.workers.synthetic.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, seed=args.seed)
    print(f"wrote the tiny gpt-oss checkpoint to {out}")
    return 0


def _read_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    if args.prompt is not None:
        return [tokenizer.encode(args.prompt)]
    if args.prompt_ids is not None:
        return [_parse_ids(args.prompt_ids, "--prompt-ids")]
    lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{args.prompts_file}:{number}"
        prompts.append(_parse_ids(line, where) if args.ids else tokenizer.encode(line))
    if not prompts:
        raise SystemExit(f"tandem: {args.prompts_file}: no prompts")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from tandem.workers.engine.llm_engine import EngineConfig
    from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError
    from tandem.workers.expert_parallel.config import ExpertParallelConfig
    from tandem.workers.expert_parallel.engine import build_engine
    from tandem.workers.synthetic.tiny_model import resolve_model_dir

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
        )
    except SamplingParamsError as err:
        raise SystemExit(f"tandem generate: {err}") from None
    try:
        ep = ExpertParallelConfig(
            size=args.ep, placement=args.ep_placement, dispatch=args.ep_dispatch
        )
    except ValueError as err:
        raise SystemExit(f"tandem generate: --ep: {err}") from None
    # --ep N > 1: N ranks (this process and N - 1 it starts), gloo on CPU, NCCL on GPUs.
    engine = build_engine(
        resolve_model_dir(args.model), EngineConfig(device=args.device, dtype=args.dtype), ep
    )
    try:
        prompts = _read_prompts(args, engine.tokenizer)
        results = engine.generate(prompts, params)
    except SamplingParamsError as err:
        raise SystemExit(f"tandem generate: {err}") from None
    finally:
        engine.runner.close()
    for result in results:
        if args.json:
            print(json.dumps(result.to_json()), flush=True)
        else:
            print(result.text, flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tandem.cluster.serve_cmd import run_serve

    return run_serve(args)


def _cmd_proto(args: argparse.Namespace) -> int:
    from tandem.cluster.api import PROTO_RESOURCE

    print(PROTO_RESOURCE.read_text(encoding="utf-8"), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write the small embedded checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_cmd_make_tiny_model)

    gen = sub.add_parser("generate", help="run the model in this process")
    gen.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-ids", help="comma-separated token ids")
    source.add_argument("--prompts-file", help="one prompt per line, run batched")
    gen.add_argument("--ids", action="store_true", help="--prompts-file lines are token ids")
    gen.add_argument("--max-tokens", type=int, required=True)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    gen.add_argument("--dtype", default=None, help="float32 or bfloat16")
    gen.add_argument(
        "--ep", type=int, default=1, help="expert-parallel ranks (processes; GPUs on cuda)"
    )
    gen.add_argument("--ep-placement", default="contiguous", help="contiguous or round_robin")
    gen.add_argument("--ep-dispatch", default="replicated", help="replicated or all_to_all")
    gen.set_defaults(run=_cmd_generate)

    serve = sub.add_parser("serve", help="run the cluster (Ray Serve) on this machine")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    serve.add_argument(
        "--config", default=None, help="Serve config file (default: deploy/serve-config.yaml)"
    )
    serve.add_argument("--prefill", type=int, default=None, help="prefill replicas")
    serve.add_argument("--decode", type=int, default=None, help="decode replicas")
    serve.add_argument("--host", default=None, help="address the gRPC server binds")
    serve.add_argument("--grpc-port", type=int, default=None)
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the OpenAI-compatible HTTP API on this port too (default: off)",
    )
    serve.add_argument(
        "--tls-cert", default=None, metavar="PEM", help="certificate chain: serve gRPC over TLS"
    )
    serve.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    serve.add_argument(
        "--redis-url", default=None, help="control-plane Redis (default: start a private one)"
    )
    serve.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key (default: the config's, "
        "TANDEM_API_KEY)",
    )
    serve.add_argument("--device", default=None, help="engine device of both pools")
    serve.set_defaults(run=_cmd_serve)

    proto = sub.add_parser("proto", help="print the gRPC API's .proto (tandem.v1)")
    proto.set_defaults(run=_cmd_proto)

    client_cli.register(sub)
    loadtest_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "ids", False) and getattr(args, "prompts_file", None) is None:
        raise SystemExit("tandem generate: --ids only applies to --prompts-file")
    raise SystemExit(args.run(args))


if __name__ == "__main__":
    main()
