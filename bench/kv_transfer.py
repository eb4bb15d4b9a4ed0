"""KV transfer GPU0 (prefill) -> GPU1 (decode) over NCCL at gpt-oss-20b shapes.

    python3 bench/kv_transfer.py             # two CUDA GPUs
    python3 bench/kv_transfer.py --cpu       # gloo, small prompts: script check

Two processes, one per GPU, drive `KVSender` / `KVReceiver` directly (no Ray); this process
only relays tickets (JSON) between them. gpt-oss-20b KV: 24 layers alternating sliding
(even) and full (odd), 8 kv heads x 64, bf16, block size 16. Full layers move every block
of the prompt; sliding layers only the blocks of the last 128 positions (what the first
decode step reads). Per prompt length:

  transfer only       begin, send 24 layers back to back, finish; wall time from the
                      sender's begin until the receiver's recv returned (data in its cache)
  prefill alone       simulated prefill compute, 24 layers, no transfer
  prefill + transfer  the same compute with `send_layer` after each layer (layer-by-layer
                      overlap), until the receiver has everything
  prefill, then send  compute all layers, then send all (no overlap), for comparison
  wire alone          the same packed layers over a bare PairGroup with every receive
                      posted beforehand, GPU-event timed: 24 messages, then as one message;
                      plus pack and unpack kernel times (what the API adds is CPU work)

The simulated prefill of a layer is a chain of [T, 2880] x [2880, 2880] bf16 GEMMs sized
to the layer's real FLOPs (projections, 4 active experts of 2880x5760 + 2880x2880, causal
attention; sliding layers attend 128 keys) run at an assumed --mfu (default 0.5) of the
790 TFLOP/s dense bf16 rate. Every transfer's blocks are checked bit for bit on GPU1
(the caches hold a hash of their position; the receiver recomputes it), and blocks not
asked for must stay zero.

Fault runs (NCCL): a sender that stalls past the deadline (the receiver fails at the
deadline, the pair is rebuilt and the next transfer is exact), and a sender process that
dies mid-transfer (NCCL does not notice: the deadline fires, the communicator is aborted,
the receiving process and its other pair carry on).

Writes $OUT/kv_transfer.json and prints a table. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 and friends, forced for every process started here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value  # inherited by the spawned roles

import torch  # noqa: E402

from tandem.workers.disagg.transfer import (  # noqa: E402
    KVLayout,
    KVReceiver,
    KVSender,
    TransferFailed,
    TransferTicket,
    pack_layer,
    packed_nbytes,
    unpack_layer,
)
from tandem.workers.disagg.transfer.pair import (  # noqa: E402
    RECEIVER_RANK,
    SENDER_RANK,
    PairGroup,
    connect_store,
)

LINK_BW = 370e9  # B/s, NCCL send/recv GPU0 -> GPU1 at 1 GiB, measured on this machine kind
MATMUL_RATE = 790e12  # FLOP/s, dense bf16
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, EXPERT_FF, TOP_K, NUM_EXPERTS = 2880, 64, 8, 64, 2880, 4, 32
NUM_LAYERS, BLOCK_SIZE, WINDOW = 24, 16, 128
LAYOUT = KVLayout(
    model="gpt-oss-20b",
    dtype="bfloat16",
    block_size=BLOCK_SIZE,
    num_layers=NUM_LAYERS,
    layer_groups=tuple(1 if i % 2 == 0 else 0 for i in range(NUM_LAYERS)),  # full=0, sliding=1
    num_kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
)
SLIDING_POOL = 64  # blocks per sliding layer cache, on both sides
SPARE_BLOCKS = 128  # full-group blocks beyond the longest prompt, so ids are scattered
REPLY_TIMEOUT_S = 90.0


# --------------------------------------------------------------------- shared helpers


def plan(tokens: int, iteration: int, sender_full: int, receiver_full: int) -> dict:
    """Block ids of one transfer, the same in every process: src, dest, logical per group."""
    rng = random.Random(tokens * 1000 + iteration)
    n_full = math.ceil(tokens / BLOCK_SIZE)
    first_sliding = max(0, tokens - (WINDOW - 1)) // BLOCK_SIZE  # keys (T - 128, T - 1]
    sliding_logical = list(range(first_sliding, (tokens - 1) // BLOCK_SIZE + 1))
    n_sliding = len(sliding_logical)
    return {
        "src": [rng.sample(range(sender_full), n_full), rng.sample(range(SLIDING_POOL), n_sliding)],
        "dest": [
            rng.sample(range(receiver_full), n_full),
            rng.sample(range(SLIDING_POOL), n_sliding),
        ],
        "logical": [list(range(n_full)), sliding_logical],
    }


def block_values(layer: int, kv: int, ids: torch.Tensor) -> torch.Tensor:
    """Content of blocks `ids` of a sender cache: a hash of (layer, kv, element index).

    ids: [n] int64 -> [n, block_size, kv_heads, head_dim] bf16, finite (exponent bit 14
    cleared), never all zero within a block.
    """
    per_block = BLOCK_SIZE * KV_HEADS * HEAD_DIM
    element = ids[:, None] * per_block + torch.arange(per_block, device=ids.device)
    x = (element * 2654435761 + (2 * layer + kv + 1) * 40503) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    x = (x ^ (x >> 15)) & 0xBFFF
    signed = (x - 65536 * (x >= 32768)).to(torch.int16)
    return signed.view(torch.bfloat16).view(-1, BLOCK_SIZE, KV_HEADS, HEAD_DIM)


def packed_bytes(p: dict, cache: torch.Tensor) -> int:
    return sum(packed_nbytes(cache, len(p["src"][g])) for g in LAYOUT.layer_groups)


def layer_flops(tokens: int, layer: int) -> float:
    """FLOPs of one gpt-oss-20b layer over a T-token prompt (matmuls only)."""
    projections = 2 * HIDDEN * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM + 2 * Q_HEADS * HEAD_DIM * HIDDEN
    router = 2 * HIDDEN * NUM_EXPERTS
    experts = TOP_K * (2 * HIDDEN * 2 * EXPERT_FF + 2 * EXPERT_FF * HIDDEN)
    if LAYOUT.layer_groups[layer] == 0:
        keys = tokens * (tokens + 1) / 2  # causal: query t reads t + 1 keys
    else:
        keys = sum(min(t + 1, WINDOW) for t in range(tokens))
    attention = 4 * Q_HEADS * HEAD_DIM * keys  # QK^T and PV
    return tokens * (projections + router + experts) + attention


def median(values: list[float]) -> float:
    return statistics.median(values)


def _alive() -> None:
    return None  # a raw bench group is never torn down by another thread


class Timer:
    """Elapsed seconds of GPU work (CUDA events on the current stream) or host time (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(True), torch.cuda.Event(True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


RAW_PREFIX = "bench-raw/"
RAW_TAG_FLAT = 1
RAW_TAG_LAYER = 2


# ---------------------------------------------------------------------- the two roles


class Prefill:
    """GPU0: owns the sender, the simulated prefill and the sender-side caches."""

    def __init__(self, device: torch.device, max_tokens: int, args: dict, sender_id: str):
        self.device = device
        self.cuda = device.type == "cuda"
        self.full_blocks = math.ceil(max_tokens / BLOCK_SIZE) + SPARE_BLOCKS
        self.receiver_full = self.full_blocks + SPARE_BLOCKS // 2
        caches = []
        for layer in range(NUM_LAYERS):
            n = self.full_blocks if LAYOUT.layer_groups[layer] == 0 else SLIDING_POOL
            ids = torch.arange(n, device=device)
            caches.append(tuple(block_values(layer, kv, ids).contiguous() for kv in range(2)))
        self.caches = caches
        self.sender = KVSender(sender_id, LAYOUT, caches, args["host"])
        self.mfu = args["mfu"]
        self.width = HIDDEN if self.cuda else 256
        self.reps: dict[int, list[int]] = {}
        self.calibration: dict[int, dict] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def calibrate(self, tokens: int) -> dict:
        """GEMMs per layer so that a layer's compute takes its FLOPs at the assumed MFU."""
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.x = torch.randn(tokens, self.width, device=self.device, dtype=dtype)
        self.w = torch.randn(self.width, self.width, device=self.device, dtype=dtype) * 0.02
        self.y = torch.empty_like(self.x)
        for _ in range(3):
            torch.matmul(self.x, self.w, out=self.y)
        self.sync()
        start = time.perf_counter()
        for _ in range(10):
            torch.matmul(self.x, self.w, out=self.y)
        self.sync()
        gemm_s = (time.perf_counter() - start) / 10
        if self.cuda:
            targets = [layer_flops(tokens, i) / (self.mfu * MATMUL_RATE) for i in range(NUM_LAYERS)]
        else:
            targets = [2e-3] * NUM_LAYERS  # CPU check: a token amount of work per layer
        self.reps[tokens] = [max(1, round(t / gemm_s)) for t in targets]
        info = {
            "gemm_ms": gemm_s * 1e3,
            "gemm_tflops": 2 * tokens * self.width**2 / gemm_s / 1e12,
            "target_prefill_ms": sum(targets) * 1e3,
            "prefill_flops": sum(layer_flops(tokens, i) for i in range(NUM_LAYERS)),
        }
        self.calibration[tokens] = info
        return info

    def compute(self, tokens: int, layer: int) -> None:
        for _ in range(self.reps[tokens][layer]):
            torch.matmul(self.x, self.w, out=self.y)

    def prefill_alone(self, tokens: int, iters: int) -> list[float]:
        times = []
        for _ in range(iters):
            self.sync()
            start = time.monotonic()
            for layer in range(NUM_LAYERS):
                self.compute(tokens, layer)
            self.sync()
            times.append(time.monotonic() - start)
        return times

    def transfer(self, command: dict) -> dict:
        ticket = TransferTicket.from_json(command["ticket"])
        tokens, mode = command["tokens"], command["mode"]
        p = plan(tokens, command["iteration"], self.full_blocks, self.receiver_full)
        self.sync()
        t0 = time.monotonic()
        transfer = self.sender.begin(ticket, p["src"])
        if mode == "sequential":
            for layer in range(NUM_LAYERS):
                self.compute(tokens, layer)
        for layer in range(NUM_LAYERS):
            if mode == "overlap":
                self.compute(tokens, layer)
            if layer == command.get("stall_after"):
                time.sleep(command["stall_s"])
            if layer == command.get("die_after"):
                self.sync()
                time.sleep(0.3)  # let the pump put the first layers on the wire
                os._exit(3)
            transfer.send_layer(layer)
        transfer.finish(7, {"t0": t0})
        try:
            transfer.wait()
            outcome = "ok"
        except TransferFailed as e:
            outcome = f"TransferFailed: {e}"
        return {"outcome": outcome, "t0": t0}

    def raw(self, command: dict) -> dict:
        """Wire time of the packed layers alone: 24 messages, then the same bytes as one.

        The receiver has posted every receive beforehand, so this times NCCL, not the
        protocol: GPU events around the sends, the end event ordered after their completion.
        """
        if not hasattr(self, "raw_group"):
            store = connect_store(command["address"], 60.0)
            self.raw_group = PairGroup.build(
                store, RAW_PREFIX, SENDER_RANK, LAYOUT, self.device, "127.0.0.1",
                time.monotonic() + 60.0,
            )  # fmt: skip
        group, deadline = self.raw_group, time.monotonic() + 120.0
        p = plan(command["tokens"], 0, self.full_blocks, self.receiver_full)
        ids = [torch.tensor(g, device=self.device) for g in p["src"]]
        layers = [i for i in range(NUM_LAYERS) if ids[LAYOUT.layer_groups[i]].numel()]
        pack_times = []
        for _ in range(5):
            with Timer(self.device) as timer:
                packed = [pack_layer(*self.caches[i], ids[LAYOUT.layer_groups[i]]) for i in layers]
            pack_times.append(timer.seconds)
        flat = torch.cat(packed)
        per_layer, single = [], []
        for _ in range(command["iters"]):
            for results, messages in ((per_layer, packed), (single, [flat])):
                self.sync()
                with Timer(self.device) as timer:
                    works = [
                        group.send(m, RAW_TAG_FLAT if len(messages) == 1 else RAW_TAG_LAYER + i)
                        for i, m in zip(layers, messages, strict=False)
                    ]
                    for work in works:
                        group.wait(work, deadline, _alive)
                results.append(timer.seconds)
        warm = command["warmup"]
        return {
            "pack_ms": median(pack_times[1:]) * 1e3,
            "layers_ms": median(per_layer[warm:]) * 1e3,
            "flat_ms": median(single[warm:]) * 1e3,
            "messages": len(layers),
        }

    def close(self) -> None:
        self.sender.close()
        if hasattr(self, "raw_group"):
            self.raw_group.abort()

    def handle(self, command: dict) -> dict:
        op = command["op"]
        if op == "raw":
            return self.raw(command)
        if op == "calibrate":
            return self.calibrate(command["tokens"])
        if op == "prefill_alone":
            return {"times": self.prefill_alone(command["tokens"], command["iters"])}
        if op == "transfer":
            return self.transfer(command)
        raise ValueError(f"unknown op {op}")


class Decode:
    """GPU1: owns the receiver, its caches, and the bit-exact checks."""

    def __init__(self, device: torch.device, max_tokens: int, args: dict):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sender_full = math.ceil(max_tokens / BLOCK_SIZE) + SPARE_BLOCKS
        self.full_blocks = self.sender_full + SPARE_BLOCKS // 2
        self.caches = [
            tuple(
                torch.zeros(
                    self.full_blocks if LAYOUT.layer_groups[layer] == 0 else SLIDING_POOL,
                    BLOCK_SIZE,
                    KV_HEADS,
                    HEAD_DIM,
                    dtype=torch.bfloat16,
                    device=device,
                )
                for _ in range(2)
            )
            for layer in range(NUM_LAYERS)
        ]
        self.receiver = KVReceiver("decode-0", LAYOUT, self.caches, args["host"])
        self.tickets: dict[int, tuple[TransferTicket, dict, float]] = {}

    def expect(self, command: dict) -> dict:
        for key, value in self.caches:
            key.zero_()
            value.zero_()
        p = plan(command["tokens"], command["iteration"], self.sender_full, self.full_blocks)
        start = time.monotonic()
        ticket = self.receiver.expect(
            command["sender"], p["dest"], p["logical"], command["timeout"]
        )
        self.tickets[command["iteration"]] = (ticket, p, start)
        return {"ticket": ticket.to_json(), "bytes": packed_bytes(p, self.caches[1][0])}

    def recv(self, command: dict) -> dict:
        ticket, p, start = self.tickets.pop(command["iteration"])
        try:
            result = self.receiver.recv(ticket)
        except TransferFailed as e:
            return {
                "outcome": f"TransferFailed: {e}",
                "pair_broken": e.pair_broken,
                "failed_after_s": time.monotonic() - start,
                "deadline_s": ticket.timeout_s,
            }
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t1 = time.monotonic()
        return {
            "outcome": "ok",
            "t1": t1,
            "t0": result.metadata.get("t0"),
            "generation": ticket.generation,
            "exact": self.check(p),
        }

    def check(self, p: dict) -> bool:
        """Dest blocks hold exactly the sender's src blocks; every other block is zero."""
        for layer in range(NUM_LAYERS):
            group = LAYOUT.layer_groups[layer]
            src = torch.tensor(p["src"][group], device=self.device)
            dest = torch.tensor(p["dest"][group], device=self.device)
            for kv in range(2):
                cache = self.caches[layer][kv]
                want = block_values(layer, kv, src).view(torch.int16)
                if not torch.equal(cache[dest].view(torch.int16), want):
                    return False
                written = cache.view(torch.int16).view(cache.shape[0], -1).ne(0).any(dim=1)
                expected = torch.zeros_like(written)
                expected[dest] = True
                if not torch.equal(written, expected):
                    return False
        return True

    def raw(self, command: dict) -> dict:
        """Receive side of Prefill.raw: post everything first, then unpack one copy (timed)."""
        if not hasattr(self, "raw_group"):
            self.raw_group = PairGroup.build(
                self.receiver.store, RAW_PREFIX, RECEIVER_RANK, LAYOUT, self.device,
                "127.0.0.1", time.monotonic() + 60.0,
            )  # fmt: skip
        group, deadline = self.raw_group, time.monotonic() + 120.0
        p = plan(command["tokens"], 0, self.sender_full, self.full_blocks)
        ids = [torch.tensor(g, device=self.device) for g in p["dest"]]
        layers = [i for i in range(NUM_LAYERS) if ids[LAYOUT.layer_groups[i]].numel()]
        sizes = [
            packed_nbytes(self.caches[i][0], ids[LAYOUT.layer_groups[i]].numel()) for i in layers
        ]
        posted = []
        for _ in range(command["iters"]):
            buffers = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
            views = list(torch.split(buffers, sizes))
            works = [group.recv(v, RAW_TAG_LAYER + i) for i, v in zip(layers, views, strict=True)]
            single = torch.empty_like(buffers)
            works.append(group.recv(single, RAW_TAG_FLAT))
            posted.append((views, single, works))
        for _, _, works in posted:
            for work in works:
                group.wait(work, deadline, _alive)
        views, single, _ = posted[-1]
        for key, value in self.caches:
            key.zero_()
            value.zero_()
        unpack_times = []
        for _ in range(5):
            with Timer(self.device) as timer:
                for i, view in zip(layers, views, strict=True):
                    unpack_layer(view, *self.caches[i], ids[LAYOUT.layer_groups[i]])
            unpack_times.append(timer.seconds)
        exact = self.check(p) and torch.equal(torch.cat(views), single)
        return {"unpack_ms": median(unpack_times[1:]) * 1e3, "exact": exact}

    def close(self) -> None:
        self.receiver.close()
        if hasattr(self, "raw_group"):
            self.raw_group.abort()

    def handle(self, command: dict) -> dict:
        if command["op"] == "raw":
            return self.raw(command)
        if command["op"] == "expect":
            return self.expect(command)
        if command["op"] == "recv":
            return self.recv(command)
        raise ValueError(f"unknown op {command['op']}")


def role_main(role: str, conn, device_spec: str, max_tokens: int, args: dict) -> None:
    """Entry point of a spawned role: JSON commands in, JSON replies out."""
    device = torch.device(device_spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if role == "decode":
        worker: Prefill | Decode = Decode(device, max_tokens, args)
        ready = {"address": worker.receiver.address}
    else:
        worker = Prefill(device, max_tokens, args, sender_id=role)
        ready = {}
    conn.send_bytes(json.dumps(ready).encode())
    while True:
        command = json.loads(conn.recv_bytes())
        if command["op"] == "exit":
            worker.close()  # groups torn down before the interpreter exits
            conn.send_bytes(b"{}")
            return
        try:
            reply = worker.handle(command)
        except Exception as e:  # report, keep serving: the orchestrator decides
            reply = {"error": f"{type(e).__name__}: {e}"}
        conn.send_bytes(json.dumps(reply).encode())


# ----------------------------------------------------------------------- orchestrator


class Role:
    def __init__(self, ctx, role: str, device: str, max_tokens: int, args: dict) -> None:
        self.name = role
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=role_main, args=(role, child, device, max_tokens, args), daemon=True
        )
        self.process.start()

    def send(self, **command) -> None:
        self.conn.send_bytes(json.dumps(command).encode())

    def reply(self, timeout: float = REPLY_TIMEOUT_S) -> dict:
        try:
            if not self.conn.poll(timeout):
                raise RuntimeError(f"{self.name} did not reply within {timeout} s")
            reply = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as e:
            raise RuntimeError(f"{self.name} is gone (exit code {self.process.exitcode})") from e
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def call(self, **command) -> dict:
        self.send(**command)
        return self.reply()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call(op="exit")
            except (RuntimeError, OSError, EOFError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Bench:
    def __init__(self, decode: Role, prefill: Role) -> None:
        self.decode, self.prefill = decode, prefill
        self.iteration = 0

    def one(self, tokens: int, mode: str, sender: Role | None = None, timeout: float = 60.0,
            **extra) -> tuple[dict, dict, dict]:  # fmt: skip
        """One transfer: ticket from decode, recv posted, sender runs; returns both replies."""
        sender = sender or self.prefill
        self.iteration += 1
        it = self.iteration
        expect = self.decode.call(
            op="expect", tokens=tokens, iteration=it, timeout=timeout, sender=sender.name
        )
        self.decode.send(op="recv", iteration=it)
        sender.send(
            op="transfer", ticket=expect["ticket"], tokens=tokens, iteration=it, mode=mode, **extra
        )
        sent = sender.reply() if "die_after" not in extra else {"outcome": "process exited"}
        received = self.decode.reply()
        return expect, sent, received

    def timed(self, tokens: int, mode: str, warmup: int, iters: int) -> dict:
        walls, exact, nbytes = [], True, 0
        for i in range(warmup + iters):
            expect, sent, received = self.one(tokens, mode)
            if received["outcome"] != "ok" or sent["outcome"] != "ok":
                raise RuntimeError(f"{mode} transfer failed: {sent} / {received}")
            exact &= received["exact"]
            nbytes = expect["bytes"]
            if i >= warmup:
                walls.append(received["t1"] - received["t0"])
        return {"wall_ms": median(walls) * 1e3, "all_ms": [w * 1e3 for w in walls],
                "bytes": nbytes, "exact": exact}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    cuda = not args.cpu
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit("needs two CUDA GPUs (or --cpu)")
    ctx = mp.get_context("spawn")
    role_args = {"host": "127.0.0.1", "mfu": args.mfu}
    max_tokens = max(args.tokens)
    devices = ("cuda:0", "cuda:1") if cuda else ("cpu", "cpu")
    decode = Role(ctx, "decode", devices[1], max_tokens, role_args)
    prefill = Role(ctx, "prefill-0", devices[0], max_tokens, role_args)
    roles = [decode, prefill]
    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(2)] if cuda else ["cpu"],
        "link_bw_GBps": LINK_BW / 1e9,
        "mfu_assumed": args.mfu,
        "sizes": {},
        "faults": {},
    }
    try:
        address = decode.reply()["address"]
        prefill.reply()
        bench = Bench(decode, prefill)
        for tokens in args.tokens:
            raw_command = {"tokens": tokens, "iters": args.warmup + args.iters}
            decode.send(op="raw", **raw_command)
            raw = prefill.call(op="raw", address=address, warmup=args.warmup, **raw_command)
            raw.update(decode.reply())
            calibration = prefill.call(op="calibrate", tokens=tokens)
            transfer = bench.timed(tokens, "transfer_only", args.warmup, args.iters)
            alone_times = prefill.call(
                op="prefill_alone", tokens=tokens, iters=args.warmup + args.iters
            )
            alone_ms = median(alone_times["times"][args.warmup :]) * 1e3
            overlap = bench.timed(tokens, "overlap", args.warmup, args.iters)
            sequential = bench.timed(tokens, "sequential", args.warmup, args.iters)
            nbytes = transfer["bytes"]
            results["sizes"][tokens] = {
                "calibration": calibration,
                "bytes": nbytes,
                "wire": raw,
                "wire_layers_GBps": nbytes / (raw["layers_ms"] / 1e3) / 1e9,
                "wire_flat_GBps": nbytes / (raw["flat_ms"] / 1e3) / 1e9,
                "transfer_only": transfer,
                "bandwidth_GBps": transfer["bytes"] / (transfer["wall_ms"] / 1e3) / 1e9,
                "prefill_alone_ms": alone_ms,
                "prefill_plus_transfer": overlap,
                "prefill_then_transfer": sequential,
                "exposed_transfer_ms": overlap["wall_ms"] - alone_ms,
                "exact": transfer["exact"] and overlap["exact"] and sequential["exact"],
            }
            print(f"done {tokens} tokens", flush=True)
        save(results)  # the fault runs may take a process down: keep the figures first
        try:
            results["faults"] = faults(bench, ctx, devices, max_tokens, role_args, roles)
        except RuntimeError as e:
            results["faults"]["error"] = str(e)
    finally:
        for role in roles:
            role.stop()
    return results


def save(results: dict) -> str:
    table = print_table(results)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_transfer.json").write_text(json.dumps(results, indent=1))
    (out / "kv_transfer.txt").write_text(table + "\n")
    return table


def faults(bench: Bench, ctx, devices, max_tokens: int, role_args: dict, roles: list) -> dict:
    tokens = min(4096, max_tokens)
    report: dict = {}
    # 1. The sender stalls after 4 layers: the receiver fails at its deadline, then the
    #    next ticket rebuilds the pair (generation + 1) and must be exact.
    _, sent, received = bench.one(tokens, "transfer_only", timeout=2.0, stall_after=4, stall_s=4.0)
    report["stall"] = {"receiver": received, "sender": sent["outcome"]}
    start = time.monotonic()
    _, sent, received = bench.one(tokens, "transfer_only", timeout=60.0)
    report["stall"]["rebuild"] = {
        "outcome": received["outcome"], "exact": received.get("exact"),
        "generation": received.get("generation"), "wall_s": time.monotonic() - start,
    }  # fmt: skip
    # 2. A second sender process dies mid-transfer on an established pair: NCCL does not
    #    notice, the deadline fires and the communicator is aborted; the decode process and
    #    its pair with prefill-0 must carry on.
    doomed = Role(ctx, "prefill-doomed", devices[0], max_tokens, role_args)
    roles.append(doomed)
    doomed.reply()
    _, warm, warm_received = bench.one(tokens, "transfer_only", sender=doomed, timeout=60.0)
    _, _, received = bench.one(tokens, "transfer_only", sender=doomed, timeout=3.0, die_after=3)
    doomed.process.join(10)
    report["killed_sender"] = {
        "warmup": warm_received["outcome"],
        "receiver": received,
        "sender_exit_code": doomed.process.exitcode,
    }
    _, sent, received = bench.one(tokens, "transfer_only", timeout=60.0)
    report["killed_sender"]["other_pair_after"] = {
        "outcome": received["outcome"], "exact": received.get("exact"),
        "generation": received.get("generation"),
    }  # fmt: skip
    return report


def print_table(results: dict) -> str:
    lines = [
        f"KV transfer, gpt-oss-20b shape, {results['devices']}, torch {results['torch']}, "
        f"NCCL {results['nccl']}, {results['date']}",
        f"simulated prefill at MFU {results['mfu_assumed']} of {MATMUL_RATE / 1e12:.0f} TFLOP/s;"
        f" link {results['link_bw_GBps']:.0f} GB/s",
        "",
        f"{'tokens':>7} {'MB':>8} {'api ms':>8} {'GB/s':>7} {'of link':>7} "
        f"{'prefill ms':>10} {'+xfer ms':>9} {'exposed':>8} {'then-send':>9} {'exact':>6}",
    ]
    lines_wire = [
        "",
        "wire alone (receives pre-posted, GPU events): 24 layer messages vs one message",
        f"{'tokens':>7} {'msgs':>5} {'layers ms':>9} {'GB/s':>7} {'of link':>7} {'1 msg ms':>8} "
        f"{'GB/s':>7} {'pack ms':>7} {'unpack ms':>9} {'exact':>6}",
    ]
    for tokens, r in results["sizes"].items():
        w = r["wire"]
        lines_wire.append(
            f"{tokens:>7} {w['messages']:>5} {w['layers_ms']:>9.3f} {r['wire_layers_GBps']:>7.1f} "
            f"{r['wire_layers_GBps'] * 1e9 / LINK_BW:>7.0%} {w['flat_ms']:>8.3f} "
            f"{r['wire_flat_GBps']:>7.1f} {w['pack_ms']:>7.3f} {w['unpack_ms']:>9.3f} "
            f"{str(w['exact']):>6}"
        )
    for tokens, r in results["sizes"].items():
        lines.append(
            f"{tokens:>7} {r['bytes'] / 1e6:>8.1f} {r['transfer_only']['wall_ms']:>8.2f} "
            f"{r['bandwidth_GBps']:>7.1f} {r['bandwidth_GBps'] * 1e9 / LINK_BW:>7.0%} "
            f"{r['prefill_alone_ms']:>10.1f} {r['prefill_plus_transfer']['wall_ms']:>9.1f} "
            f"{r['exposed_transfer_ms']:>8.2f} {r['prefill_then_transfer']['wall_ms']:>9.1f} "
            f"{str(r['exact']):>6}"
        )
    lines.extend(lines_wire)
    lines.append("")
    lines.append("faults: " + json.dumps(results["faults"], indent=1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU, small prompts")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mfu", type=float, default=0.5)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = [256, 1024] if args.cpu else [4096, 32768]
    print(save(run(args)))


if __name__ == "__main__":
    sys.exit(main())
