"""The prefill (sender) side of tests/test_kv_transfer.py, run in a spawned process.

The process starts through `runpy.run_path` on this file (a standard-library target, so the
child needs nothing of the tests importable): SenderProcess passes the arguments of
sender_main as the global SENDER_ARGS and this file's run name as RUN_NAME.
"""

from __future__ import annotations

import json
import time

import torch

from tandem.workers.disagg.transfer import (
    KVLayout,
    KVLayoutMismatch,
    KVSender,
    TransferFailed,
    TransferTicket,
)

HOST = "127.0.0.1"
RUN_NAME = "tandem_kv_sender"


def make_caches(
    layout: KVLayout, blocks_per_group: tuple[int, ...], seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) caches of random values, reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for layer in range(layout.num_layers):
        shape = (
            blocks_per_group[layout.layer_groups[layer]],
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        pair = tuple(
            torch.randn(shape, generator=gen, dtype=torch.float32).to(layout.torch_dtype)
            for _ in range(2)
        )
        caches.append(pair)
    return caches


def sender_main(conn, sender_id: str, layout_json: str, blocks: list[int], seed: int) -> None:
    """The prefill worker: runs transfers as told; replies one JSON line per command."""
    layout = KVLayout.from_json(layout_json)
    sender = KVSender(sender_id, layout, make_caches(layout, tuple(blocks), seed), HOST)
    while True:
        command = json.loads(conn.recv_bytes())
        if command["op"] == "exit":
            sender.close()
            conn.send_bytes(b"{}")
            return
        transfers = []
        for spec in command["transfers"]:
            ticket = TransferTicket.from_json(spec["ticket"])
            transfers.append(sender.begin(ticket, spec["src"]))
        order = command.get("send_order", list(range(len(transfers))))
        abandon = command.get("abandon")  # {"index": i, "after_layers": k}
        for layer in range(layout.num_layers):
            if layer == command.get("notify_after_layers"):
                conn.send_bytes(json.dumps({"partial": True}).encode())
                conn.recv_bytes()  # the parent kills this process while it waits here
            if layer == command.get("stall_after_layers"):
                time.sleep(command["stall_s"])
            for i in order:
                if abandon and abandon["index"] == i and abandon["after_layers"] == layer:
                    transfers[i].abandon("request cancelled")
                if not (abandon and abandon["index"] == i and layer >= abandon["after_layers"]):
                    transfers[i].send_layer(layer)
        for i in command.get("finish_order", order):
            if not (abandon and abandon["index"] == i):
                spec = command["transfers"][i]
                transfers[i].finish(spec["first_token"], {"index": i})
        outcomes = []
        for transfer in transfers:
            try:
                transfer.wait()
                outcomes.append("ok")
            except (TransferFailed, KVLayoutMismatch) as e:
                outcomes.append(f"{type(e).__name__}: {e}")
        conn.send_bytes(json.dumps({"outcomes": outcomes}).encode())


if __name__ == RUN_NAME:
    sender_main(**globals()["SENDER_ARGS"])
