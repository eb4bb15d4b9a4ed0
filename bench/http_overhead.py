"""What the OpenAI-compatible HTTP front costs over gRPC, on the same cluster.

    .venv/bin/python -m bench.http_overhead [--requests 40] [--max-tokens 8]

One local cluster (tests/support/cluster.py: a private Redis, Ray, 1 prefill + 1 decode
+ 1 Ingress replica of the tiny model on CPU, Serve's HTTP proxy on). The same requests
(a 48-token prompt of ids, greedy, exactly --max-tokens tokens) run one at a time through
gRPC (TandemClient) and through HTTP (the official `openai` client, streamed
/v1/completions), alternating, so drift in the machine's load falls on both. Reported:
median and p90 of the client's time to the first token and to the last, per front. The
HTTP path adds Serve's proxy hop and JSON/SSE encoding; the engine work is identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import openai

from tandem.cluster.client import TandemClient
from tandem.workers.synthetic.tiny_model import default_model_dir
from tests.support.cluster import TEST_ENGINE, free_port, serve_cluster, wait_for

ENGINE = TEST_ENGINE


def _grpc(client: TandemClient, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    for chunk in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
    return first - start, time.perf_counter() - start


def _http(client: openai.OpenAI, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
    return (first or time.perf_counter()) - start, time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    with serve_cluster(
        str(default_model_dir()),
        app="tandem-http-bench",
        cluster_name="http-bench",
        engine=ENGINE,
        placement={"prefill": "least_loaded", "decode": "least_loaded"},
        prefill=1,
        decode=1,
        ingress=1,
        http_port=port,
    ) as cluster:
        base = f"http://127.0.0.1:{port}/v1"
        http = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
        wait_for(lambda: list(http.models.list()), 60, "the HTTP proxy")
        results: dict[str, dict[str, list[float]]] = {
            f: {"ttft": [], "total": []} for f in ("grpc", "http")
        }
        with TandemClient(cluster.target) as grpc_client:
            for i in range(args.requests + 4):
                for front in ("grpc", "http") if i % 2 else ("http", "grpc"):
                    # A prompt of its own for every request (no prefix-cache hits).
                    shift = 3 if front == "http" else 0
                    prompt = [(7 * i + shift + 11 * j) % 5000 + 10 for j in range(48)]
                    if front == "grpc":
                        ttft, total = _grpc(grpc_client, prompt, args.max_tokens)
                    else:
                        ttft, total = _http(http, prompt, args.max_tokens)
                    if i >= 4:  # the first few warm both paths up
                        results[front]["ttft"].append(ttft)
                        results[front]["total"].append(total)
        http.close()
    report = {
        "machine": f"{platform.machine()} {platform.node()}",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        **{front: {k: _summary(v) for k, v in r.items()} for front, r in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
