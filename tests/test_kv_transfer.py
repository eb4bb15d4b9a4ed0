"""KV transfer between a prefill (sender) and a decode (receiver) worker over real gloo groups.

The test process is the decode worker; each test spawns one prefill worker process that
obeys JSON commands over a pipe. Caches are filled from a seed, so the parent rebuilds the
sender's cache on its own and checks every received block bit for bit (bf16 compared as
int16), and that no other block of the receiver changed.
"""

from __future__ import annotations

import ast
import json
import multiprocessing as mp
import os
import random
import runpy
import signal
import time
from pathlib import Path

import pytest
import torch

from tandem.workers.disagg.transfer import (
    KVLayout,
    KVLayoutMismatch,
    KVReceiver,
    TransferFailed,
    TransferTicket,
    pack_layer,
    packed_nbytes,
    unpack_layer,
)
from tandem.workers.disagg.transfer.protocol import FRAME_BYTES, decode_frame, encode_frame
from tests.support import kv_sender
from tests.support.kv_sender import HOST, make_caches

# Tiny gpt-oss shape: layers (sliding, full, sliding, full) -> group 0 = full {1, 3},
# group 1 = sliding {0, 2}; block_size 8, 2 kv heads, head_dim 16.
LAYOUT = KVLayout("tiny-gpt-oss", "bfloat16", 8, 4, (1, 0, 1, 0), 2, 16)
SENDER_BLOCKS = (40, 12)
RECEIVER_BLOCKS = (32, 10)
SENDER_SEED = 1234
REPLY_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


class SenderProcess:
    """A spawned prefill worker and the pipe that drives it."""

    def __init__(self, sender_id: str = "prefill-0", layout: KVLayout = LAYOUT) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        args = {"conn": child_conn, "sender_id": sender_id, "layout_json": layout.to_json(),
                "blocks": list(SENDER_BLOCKS), "seed": SENDER_SEED}
        self.process = ctx.Process(
            target=runpy.run_path,
            args=(kv_sender.__file__,),
            kwargs={"init_globals": {"SENDER_ARGS": args}, "run_name": kv_sender.RUN_NAME},
            daemon=True,
        )
        self.process.start()
        self.sender_id = sender_id

    def command(self, **command) -> None:
        self.conn.send_bytes(json.dumps(command).encode())

    def reply(self) -> dict:
        if not self.conn.poll(REPLY_TIMEOUT_S):
            raise AssertionError("sender process did not reply")
        return json.loads(self.conn.recv_bytes())

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.command(op="exit")
                self.reply()
            except (OSError, AssertionError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@pytest.fixture
def receiver():
    caches = make_caches(LAYOUT, RECEIVER_BLOCKS, seed=99)
    recv = KVReceiver("decode-0", LAYOUT, caches, HOST)
    yield recv
    recv.close()


@pytest.fixture
def sender_process():
    processes = []

    def start(**kwargs) -> SenderProcess:
        processes.append(SenderProcess(**kwargs))
        return processes[-1]

    yield start
    for process in processes:
        process.stop()


def plan_transfer(rng: random.Random, full_blocks: int, sliding_blocks: int):
    """Random distinct src ids on the sender, distinct dest ids on the receiver, per group."""
    counts = (full_blocks, sliding_blocks)
    src = [rng.sample(range(SENDER_BLOCKS[g]), counts[g]) for g in range(2)]
    dest = [rng.sample(range(RECEIVER_BLOCKS[g]), counts[g]) for g in range(2)]
    logical = [list(range(counts[0])), list(range(5, 5 + counts[1]))]
    return src, dest, logical


def check_received(receiver: KVReceiver, before, transfers) -> None:
    """Dest blocks equal the sender's src blocks exactly; every other block is unchanged."""
    expected_src = make_caches(LAYOUT, SENDER_BLOCKS, SENDER_SEED)
    for layer in range(LAYOUT.num_layers):
        group = LAYOUT.layer_groups[layer]
        for kv in range(2):
            got = bits(receiver.kv_caches[layer][kv])
            want = bits(before[layer][kv]).clone()
            for src, dest in transfers:
                for s, d in zip(src[group], dest[group], strict=True):
                    want[d] = bits(expected_src[layer][kv])[s]
            assert torch.equal(got, want), f"layer {layer} {'kv'[kv]} differs"


def snapshot(receiver: KVReceiver):
    return [(k.clone(), v.clone()) for k, v in receiver.kv_caches]


# ------------------------------------------------------------------------ unit tests


def test_layout_from_tiny_config_and_json_round_trip():
    from tandem.workers.synthetic.tiny_model import TINY_CONFIG

    layout = KVLayout.from_config(TINY_CONFIG, "tiny-gpt-oss", torch.bfloat16, 8)
    assert layout == LAYOUT
    assert layout.layers_of_group(0) == (1, 3)
    assert layout.layers_of_group(1) == (0, 2)
    assert KVLayout.from_json(layout.to_json()) == layout
    assert layout.block_bytes == 8 * 2 * 16 * 2


def test_layout_mismatch_names_every_differing_field():
    other = KVLayout("other-model", "float16", 16, 4, (1, 0, 1, 0), 2, 16)
    with pytest.raises(KVLayoutMismatch) as info:
        LAYOUT.check_compatible(other)
    message = str(info.value)
    assert "model 'tiny-gpt-oss' here vs 'other-model' at peer" in message
    assert "dtype 'bfloat16' here vs 'float16' at peer" in message
    assert "block_size 8 here vs 16 at peer" in message
    assert "num_layers" not in message
    LAYOUT.check_compatible(KVLayout.from_json(LAYOUT.to_json()))
    with pytest.raises(KVLayoutMismatch, match="unreadable"):
        KVLayout.from_json('{"model": "x"}')


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"dtype": "float64x"}, "dtype"),
        ({"layer_groups": (0, 2, 0, 2)}, "layer_groups"),
        ({"layer_groups": (0, 1, 0)}, "layer_groups"),
        ({"model": ""}, "model"),
    ],
)
def test_layout_validation_names_the_field(kwargs, field):
    fields = dict(
        model="m", dtype="bfloat16", block_size=8, num_layers=4,
        layer_groups=(1, 0, 1, 0), num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    fields.update(kwargs)
    with pytest.raises(ValueError, match=field):
        KVLayout(**fields)


def test_check_caches_rejects_wrong_shapes():
    caches = make_caches(LAYOUT, (5, 3), seed=0)
    assert LAYOUT.check_caches(caches) == [5, 3]
    bad = list(caches)
    bad[3] = (torch.zeros(4, 8, 2, 16, dtype=torch.bfloat16),) * 2
    with pytest.raises(ValueError, match="group 0"):
        LAYOUT.check_caches(bad)
    bad[3] = (torch.zeros(5, 8, 2, 16, dtype=torch.float16),) * 2
    with pytest.raises(ValueError, match="dtype"):
        LAYOUT.check_caches(bad)


def test_pack_unpack_against_plain_loops():
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(9, 4, 3, 8, generator=gen).to(torch.bfloat16)
    value = torch.randn(9, 4, 3, 8, generator=gen).to(torch.bfloat16)
    src_ids = [7, 0, 4, 4]
    packed = pack_layer(key, value, torch.tensor(src_ids))
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(key, 4)
    as_blocks = packed.view(torch.bfloat16).view(2, 4, 4, 3, 8)
    for i, s in enumerate(src_ids):
        assert torch.equal(bits(as_blocks[0, i]), bits(key[s]))
        assert torch.equal(bits(as_blocks[1, i]), bits(value[s]))

    dest_key = torch.zeros(6, 4, 3, 8, dtype=torch.bfloat16)
    dest_value = torch.zeros(6, 4, 3, 8, dtype=torch.bfloat16)
    dest_ids = [5, 1, 2, 0]
    unpack_layer(packed, dest_key, dest_value, torch.tensor(dest_ids))
    for i, d in enumerate(dest_ids):
        assert torch.equal(bits(dest_key[d]), bits(key[src_ids[i]]))
        assert torch.equal(bits(dest_value[d]), bits(value[src_ids[i]]))
    assert torch.count_nonzero(bits(dest_key[3])) == 0
    with pytest.raises(ValueError, match="bytes"):
        unpack_layer(packed[:-1], dest_key, dest_value, torch.tensor(dest_ids))


def test_ticket_and_frame_round_trip():
    ticket = TransferTicket(
        "decode-0", "ab12", "127.0.0.1:5000", "prefill-0", 3, 7, ((0, 1), (5,)), 2.5
    )
    assert TransferTicket.from_json(ticket.to_json()) == ticket
    assert ticket.num_blocks == (2, 1)
    with pytest.raises(ValueError, match="store_address|address"):
        TransferTicket("d", "i", "no-port", "p", 0, 0, ((),), 1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        TransferTicket("d", "i", "h:1", "p", 0, 0, ((),), 0.0)
    frame = encode_frame({"seq": 4, "metadata": {"a": [1, 2]}}, torch.device("cpu"))
    assert frame.shape == (FRAME_BYTES,)
    assert decode_frame(frame) == {"seq": 4, "metadata": {"a": [1, 2]}}
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame({"x": "y" * FRAME_BYTES}, torch.device("cpu"))


def test_store_binds_only_the_given_address(receiver):
    """The rendezvous store listens on 127.0.0.1 only, not on the wildcard address."""
    port = int(receiver.address.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex


def test_transfer_package_never_pickles():
    """No pickle-based module or torch.distributed object collective anywhere in the package."""
    forbidden_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    forbidden_names = {
        "send_object_list", "recv_object_list", "broadcast_object_list",
        "all_gather_object", "gather_object", "scatter_object_list",
        "Unpickler", "Pickler", "loads", "load", "save",
    }  # fmt: skip
    package = Path(__file__).resolve().parents[1] / "workers" / "disagg" / "transfer"
    files = sorted(package.glob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]} | {a.name for a in node.names}
            elif isinstance(node, ast.Attribute):
                names = {node.attr}
            elif isinstance(node, ast.Name):
                names = {node.id}
            else:
                continue
            bad = names & (forbidden_modules | forbidden_names)
            if bad == {"loads"} and isinstance(node, ast.Attribute):
                # json.loads is the one allowed `loads`.
                assert isinstance(node.value, ast.Name) and node.value.id == "json", path
                continue
            assert not bad, f"{path.name}:{node.lineno} uses {bad}"


# -------------------------------------------------------------- process-level tests


def test_transfers_are_bit_exact_and_ordered(receiver, sender_process):
    sender = sender_process()
    rng = random.Random(0)
    before = snapshot(receiver)

    # One transfer: different src and dst ids, both groups, every layer.
    src, dest, logical = plan_transfer(rng, full_blocks=6, sliding_blocks=3)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    sender.command(
        op="run", transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 17}]
    )
    result = receiver.recv(ticket)
    assert (result.seq, result.first_token, dict(result.metadata)) == (0, 17, {"index": 0})
    assert sender.reply() == {"outcomes": ["ok"]}
    check_received(receiver, before, [(src, dest)])

    # Three transfers on the same pair: begun and sent interleaved layer by layer in the
    # order 2, 0, 1 (a batched prefill), finished 1, 2, 0; they still land in seq order.
    before = snapshot(receiver)
    plans = _disjoint_plans(rng, count=3)
    tickets = [receiver.expect(sender.sender_id, d, lg, timeout_s=20.0) for _, d, lg in plans]
    assert [t.seq for t in tickets] == [1, 2, 3]
    assert {t.generation for t in tickets} == {0}
    sender.command(
        op="run",
        transfers=[
            {"ticket": t.to_json(), "src": s, "first_token": 100 + i}
            for i, (t, (s, _, _)) in enumerate(zip(tickets, plans, strict=True))
        ],
        send_order=[2, 0, 1],
        finish_order=[1, 2, 0],
    )
    results = [receiver.recv(tickets[i]) for i in (2, 0, 1)]
    assert [(r.seq, r.first_token) for r in results] == [(3, 102), (1, 100), (2, 101)]
    assert sender.reply() == {"outcomes": ["ok", "ok", "ok"]}
    check_received(receiver, before, [(s, d) for s, d, _ in plans])
    assert receiver.generation(sender.sender_id) == 0


def _disjoint_plans(rng: random.Random, count: int):
    """`count` transfers whose dest blocks do not overlap (per group)."""
    dest_pool = [rng.sample(range(RECEIVER_BLOCKS[g]), RECEIVER_BLOCKS[g]) for g in range(2)]
    plans = []
    for i in range(count):
        src = [rng.sample(range(SENDER_BLOCKS[0]), 3), rng.sample(range(SENDER_BLOCKS[1]), 2)]
        dest = [dest_pool[0][3 * i : 3 * i + 3], dest_pool[1][2 * i : 2 * i + 2]]
        plans.append((src, dest, [[0, 1, 2], [7, 8]]))
    return plans


def test_layout_mismatch_is_refused_at_pair_setup(receiver, sender_process):
    other = KVLayout("tiny-gpt-oss", "bfloat16", 16, 4, (1, 0, 1, 0), 2, 16)
    sender = sender_process(layout=other)
    ticket = receiver.expect(sender.sender_id, [[0], [1]], [[0], [0]], timeout_s=20.0)
    sender.command(op="run", transfers=[{"ticket": ticket.to_json(), "src": [[0], [0]],
                                         "first_token": 1}])  # fmt: skip
    with pytest.raises(KVLayoutMismatch, match="block_size 8 here vs 16 at peer"):
        receiver.recv(ticket)
    (outcome,) = sender.reply()["outcomes"]
    assert outcome.startswith("KVLayoutMismatch") and "block_size 16 here vs 8 at peer" in outcome


def test_stalled_sender_fails_at_deadline_and_pair_is_rebuilt(receiver, sender_process):
    sender = sender_process()
    rng = random.Random(1)
    src, dest, logical = plan_transfer(rng, full_blocks=4, sliding_blocks=2)
    timeout_s = 2.0
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=timeout_s)
    sender.command(
        op="run",
        transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 5}],
        stall_after_layers=1,
        stall_s=3.5,
    )
    start = time.monotonic()
    with pytest.raises(TransferFailed, match="deadline") as info:
        receiver.recv(ticket)
    elapsed = time.monotonic() - start
    assert info.value.pair_broken
    # Generous slack: this guards against a hang, it is not a speed measurement.
    assert elapsed < timeout_s + 2.0
    (outcome,) = sender.reply()["outcomes"]
    assert outcome.startswith("TransferFailed")

    # The next transfer builds generation 1 (new prefix, new group) and is exact.
    before = snapshot(receiver)
    src, dest, logical = plan_transfer(rng, full_blocks=5, sliding_blocks=2)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    assert (ticket.generation, ticket.seq) == (1, 0)
    sender.command(op="run", transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 6}])
    assert receiver.recv(ticket).first_token == 6
    assert sender.reply() == {"outcomes": ["ok"]}
    check_received(receiver, before, [(src, dest)])


def test_killed_sender_fails_within_deadline(receiver, sender_process):
    sender = sender_process()
    rng = random.Random(2)
    # A first transfer sets the pair up, so the kill lands mid-transfer, not mid-setup.
    src, dest, logical = plan_transfer(rng, full_blocks=2, sliding_blocks=1)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    sender.command(op="run", transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 4}])
    assert receiver.recv(ticket).first_token == 4
    assert sender.reply() == {"outcomes": ["ok"]}

    src, dest, logical = plan_transfer(rng, full_blocks=4, sliding_blocks=2)
    timeout_s = 10.0
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=timeout_s)
    sender.command(
        op="run",
        transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 5}],
        notify_after_layers=2,
    )
    assert sender.reply() == {"partial": True}  # layers 0 and 1 are on their way
    start = time.monotonic()
    os.kill(sender.process.pid, signal.SIGKILL)
    with pytest.raises(TransferFailed) as info:
        receiver.recv(ticket)
    assert time.monotonic() - start < timeout_s
    assert info.value.pair_broken
    assert "peer failed" in str(info.value)  # noticed from the closed connection, not a timer
    # The receiver is still usable: the next ticket for that sender opens generation 1.
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=0.5)
    assert ticket.generation == 1
    receiver.cancel(ticket)


def test_abandon_and_cancel_keep_the_pair(receiver, sender_process):
    sender = sender_process()
    rng = random.Random(3)

    # Abandoned before the first layer: one "abandoned" header, nothing written.
    before = snapshot(receiver)
    src, dest, logical = plan_transfer(rng, full_blocks=3, sliding_blocks=2)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    sender.command(
        op="run",
        transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 1}],
        abandon={"index": 0, "after_layers": 0},
    )
    with pytest.raises(TransferFailed, match="abandoned") as info:
        receiver.recv(ticket)
    assert not info.value.pair_broken
    assert sender.reply()["outcomes"][0].startswith("TransferFailed: abandoned")
    check_received(receiver, before, [])

    # Abandoned after two layers: the rest is padded, the footer says failed.
    src, dest, logical = plan_transfer(rng, full_blocks=3, sliding_blocks=2)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    sender.command(
        op="run",
        transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 1}],
        abandon={"index": 0, "after_layers": 2},
    )
    with pytest.raises(TransferFailed, match="request cancelled") as info:
        receiver.recv(ticket)
    assert not info.value.pair_broken
    sender.reply()

    # Cancelled by the receiver: the sender still sends, nothing is written.
    before = snapshot(receiver)
    src, dest, logical = plan_transfer(rng, full_blocks=3, sliding_blocks=2)
    cancelled = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    receiver.cancel(cancelled)
    src2, dest2, logical2 = plan_transfer(rng, full_blocks=4, sliding_blocks=1)
    ticket = receiver.expect(sender.sender_id, dest2, logical2, timeout_s=20.0)
    sender.command(
        op="run",
        transfers=[
            {"ticket": cancelled.to_json(), "src": src, "first_token": 2},
            {"ticket": ticket.to_json(), "src": src2, "first_token": 3},
        ],
    )
    assert receiver.recv(ticket).first_token == 3
    assert sender.reply() == {"outcomes": ["ok", "ok"]}
    check_received(receiver, before, [(src2, dest2)])
    assert receiver.generation(sender.sender_id) == 0

    # Dropping the sender (say the registry lost it) tears the pair down; the next ticket
    # opens generation 1 and the sender follows it.
    receiver.drop_sender(sender.sender_id)
    before = snapshot(receiver)
    src, dest, logical = plan_transfer(rng, full_blocks=2, sliding_blocks=1)
    ticket = receiver.expect(sender.sender_id, dest, logical, timeout_s=20.0)
    assert (ticket.generation, ticket.seq) == (1, 0)
    sender.command(op="run", transfers=[{"ticket": ticket.to_json(), "src": src, "first_token": 9}])
    assert receiver.recv(ticket).first_token == 9
    assert sender.reply() == {"outcomes": ["ok"]}
    check_received(receiver, before, [(src, dest)])
