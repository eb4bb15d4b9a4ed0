"""Prefill side of KV transfer: push the blocks a decode worker asked for, layer by layer.

    sender = KVSender("prefill-3", layout, kv_caches, host="10.0.0.7")
    transfer = sender.begin(ticket, src_block_ids)   # [g][i] holds ticket.logical_blocks[g][i]
    for layer in range(num_layers):
        ... compute the layer (its KV is written into kv_caches) ...
        transfer.send_layer(layer)                   # packs now, sends in the background
    transfer.finish(first_token, {"cached_tokens": 0})
    transfer.wait()                                  # None, or TransferFailed by the deadline

`send_layer` packs the layer's selected blocks on the caller's current CUDA stream (so it
reads the cache after the layer wrote it) into a buffer of its own, and returns; a pump
thread per pair sends the buffers in order. The cache blocks may be freed or reused as
soon as `finish` or `abandon` returned: nothing reads them afterwards.

Ordering: transfers of a pair leave in `seq` order whatever order `begin` was called in.
A transfer whose turn has not come keeps its packed layers queued (memory: its whole KV)
until the earlier ones are finished or abandoned; so a batched prefill may interleave
`send_layer` calls of several transfers freely. A seq that never begins holds the later
ones back until their deadlines, which then tear the pair down.

A failed transfer (deadline, receiver gone) does not raise from `send_layer` / `finish`,
which then do nothing: the model loop runs on, and `wait` reports the failure.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tandem.workers.disagg.transfer.layout import KVLayout, KVLayoutMismatch
from tandem.workers.disagg.transfer.pack import pack_layer, packed_nbytes
from tandem.workers.disagg.transfer.pair import (
    SENDER_RANK,
    PairGroup,
    PumpedPair,
    connect_store,
    tear_down_and_join,
)
from tandem.workers.disagg.transfer.protocol import (
    TAG_FIRST_LAYER,
    TAG_FOOTER,
    TAG_HEADER,
    TransferFailed,
    TransferTicket,
    encode_frame,
    footer_message,
    header_message,
)

_CPU = torch.device("cpu")
_MAX_REASON = 1000
# Abandon reasons travel in a 4 KiB frame; longer ones are cut.


class _Outgoing:
    """One transfer as the pump sees it: its queue of packed layers and how it ended."""

    def __init__(self, ticket: TransferTicket, src_ids: list[torch.Tensor], deadline: float):
        self.ticket = ticket
        self.seq = ticket.seq
        self.src_ids = src_ids  # per group: [n_g] int64 on the cache device
        self.deadline = deadline
        self.ops: deque[tuple[Any, ...]] = deque()
        # ("layer", layer, packed uint8, cuda event | None) | ("finish", frame) |
        # ("abandon", reason)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def settle(self, error: BaseException | None = None) -> None:
        with self._lock:
            if not self.done.is_set():
                self.error = error
                self.done.set()


class _SenderPair(PumpedPair):
    """One generation of the pair with one receiver, with the thread that sends on it."""

    def __init__(self, owner: KVSender, ticket: TransferTicket, setup_deadline: float) -> None:
        self.owner = owner
        self.generation = ticket.generation
        self.store_address = ticket.store_address
        self.prefix = f"tandem/kv/{ticket.receiver_instance}/{owner.sender_id}/{ticket.generation}/"
        self.setup_deadline = setup_deadline
        self.cond = threading.Condition()
        self.outgoing: dict[int, _Outgoing] = {}
        self.next_seq = 0
        self.broken: str | None = None
        self.group: PairGroup | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"kv-send-{ticket.receiver_id}-{self.generation}", daemon=True
        )
        self._started = False

    def submit(self, outgoing: _Outgoing) -> bool:
        """Queue a transfer; False if the pair is already torn down."""
        with self.cond:
            if self.broken is not None:
                return False
            if outgoing.seq < self.next_seq or outgoing.seq in self.outgoing:
                raise ValueError(f"transfer seq {outgoing.seq} was already begun on this pair")
            self.outgoing[outgoing.seq] = outgoing
            self.cond.notify_all()
            start, self._started = not self._started, True
        if start:
            self.thread.start()
        return True

    def push(self, outgoing: _Outgoing, op: tuple[Any, ...]) -> None:
        with self.cond:
            outgoing.ops.append(op)
            self.cond.notify_all()

    def _open_transfers(self) -> list:
        return list(self.outgoing.values())

    def _run(self) -> None:
        owner = self.owner
        if owner.device.type == "cuda":
            torch.cuda.set_device(owner.device)
        name = f"pair with {self.store_address} (generation {self.generation})"
        try:
            store = connect_store(self.store_address, self.setup_deadline - time.monotonic())
            group = PairGroup.build(
                store,
                self.prefix,
                SENDER_RANK,
                owner.layout,
                owner.device,
                owner.host,
                self.setup_deadline,
            )
            with self.cond:
                if self.broken is not None:
                    group.abort()
                    return
                self.group = group
            seq = 0
            while (outgoing := self._wait_for(seq)) is not None:
                self._send(outgoing)
                with self.cond:
                    self.outgoing.pop(seq, None)
                    seq = self.next_seq = seq + 1
        except KVLayoutMismatch as e:
            self.tear_down(f"{name} refused: {e}", mismatch=True)
        except TransferFailed as e:
            self.tear_down(f"{name} broken: {e}")
        except Exception as e:  # any other fault of this pair must fail its transfers, not hang
            self.tear_down(f"{name} broken: {type(e).__name__}: {e}")
        finally:
            with self.cond:
                self.group = None

    def _wait_for(self, seq: int) -> _Outgoing | None:
        """The transfer whose turn it is; later ones may expire meanwhile (pair torn down)."""
        with self.cond:
            while self.broken is None and seq not in self.outgoing:
                now = time.monotonic()
                waiting = list(self.outgoing.values())
                expired = [o.seq for o in waiting if o.deadline <= now]
                if expired:
                    raise TransferFailed(
                        f"transfer {expired[0]} missed its deadline waiting for transfer {seq}"
                    )
                timeout = min((o.deadline for o in waiting), default=now + 60.0) - now
                self.cond.wait(timeout)
            return None if self.broken is not None else self.outgoing[seq]

    def _next_op(self, outgoing: _Outgoing) -> tuple[Any, ...]:
        with self.cond:
            while self.broken is None and not outgoing.ops:
                remaining = outgoing.deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferFailed(f"transfer {outgoing.seq} missed its deadline")
                self.cond.wait(remaining)
            if self.broken is not None:
                raise TransferFailed(self.broken)
            return outgoing.ops.popleft()

    def _send(self, outgoing: _Outgoing) -> None:
        group = self.group
        assert group is not None
        layout, device, caches = self.owner.layout, self.owner.device, self.owner.kv_caches
        seq, deadline, blocks = outgoing.seq, outgoing.deadline, outgoing.ticket.num_blocks

        # The header waits for the first op, so a transfer abandoned before its first layer
        # costs one frame instead of a stream of zero-filled layers.
        op = self._next_op(outgoing)
        if op[0] == "abandon":
            frame = encode_frame(
                header_message(self.generation, seq, blocks, "abandoned", op[1]), device
            )
            group.wait(group.send(frame, TAG_HEADER), deadline, self.stopped)
            outgoing.settle(TransferFailed(f"abandoned: {op[1]}", pair_broken=False))
            return
        header = encode_frame(header_message(self.generation, seq, blocks, "ok"), device)
        in_flight: deque[tuple[Any, torch.Tensor]] = deque()
        in_flight.append((group.send(header, TAG_HEADER), header))
        next_layer = 0
        abandoned: str | None = None
        while True:
            if op[0] == "layer":
                _, layer, packed, event = op
                if event is not None:
                    torch.cuda.current_stream(device).wait_event(event)
                in_flight.append((group.send(packed, TAG_FIRST_LAYER + layer), packed))
                next_layer = layer + 1
                # Free buffers of layers already delivered; a send error surfaces here.
                while in_flight and in_flight[0][0].is_completed():
                    group.wait(in_flight.popleft()[0], deadline, self.stopped)
            elif op[0] == "finish":
                frame = op[1].to(device)
                in_flight.append((group.send(frame, TAG_FOOTER), frame))
                break
            else:
                # Abandoned mid-way: the receiver has posted every layer, so send zeros for
                # the rest and mark the footer failed; the pair stays in step.
                abandoned = op[1]
                rest = [
                    (layer, packed_nbytes(caches[layer][0], blocks[layout.layer_groups[layer]]))
                    for layer in range(next_layer, layout.num_layers)
                    if blocks[layout.layer_groups[layer]]
                ]
                zeros = torch.zeros(
                    max((size for _, size in rest), default=0), dtype=torch.uint8, device=device
                )
                for layer, size in rest:
                    in_flight.append((group.send(zeros[:size], TAG_FIRST_LAYER + layer), zeros))
                frame = encode_frame(footer_message(seq, "failed", -1, {}, abandoned), device)
                in_flight.append((group.send(frame, TAG_FOOTER), frame))
                break
            op = self._next_op(outgoing)
        for work, _ in in_flight:
            group.wait(work, deadline, self.stopped)
        outgoing.settle(
            None
            if abandoned is None
            else TransferFailed(f"abandoned: {abandoned}", pair_broken=False)
        )


class KVSendTransfer:
    """Handle of one transfer on the prefill side; calls come from the model loop."""

    def __init__(self, sender: KVSender, pair: _SenderPair | None, outgoing: _Outgoing) -> None:
        self._sender = sender
        self._pair = pair
        self._outgoing = outgoing
        self._lock = threading.Lock()
        self._next_layer = 0
        self._closed = False

    @property
    def seq(self) -> int:
        return self._outgoing.seq

    def send_layer(self, layer_index: int) -> None:
        """Queue layer `layer_index` (in order 0, 1, ...) once its KV is in the cache."""
        layout = self._sender.layout
        with self._lock:
            if self._closed:
                raise ValueError("send_layer after finish or abandon")
            if layer_index != self._next_layer:
                raise ValueError(
                    f"send_layer({layer_index}) out of order: expected layer {self._next_layer}"
                )
            self._next_layer += 1
        group = layout.layer_groups[layer_index]
        if self._pair is None or self._outgoing.done.is_set():
            return
        if not self._outgoing.ticket.num_blocks[group]:
            return  # nothing of this layer's group is wanted: no message on the wire
        key_cache, value_cache = self._sender.kv_caches[layer_index]
        packed = pack_layer(key_cache, value_cache, self._outgoing.src_ids[group])
        event = None
        if packed.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pair.push(self._outgoing, ("layer", layer_index, packed, event))

    def finish(self, first_token: int, metadata: Mapping[str, Any] | None = None) -> None:
        """Close the transfer with the sampled first token; metadata must be small JSON."""
        if not isinstance(first_token, int) or isinstance(first_token, bool) or first_token < 0:
            raise ValueError(f"first_token must be a non-negative int, got {first_token!r}")
        frame = encode_frame(
            footer_message(self.seq, "ok", first_token, dict(metadata or {})), _CPU
        )
        num_layers = self._sender.layout.num_layers
        with self._lock:
            if self._closed:
                raise ValueError("finish after finish or abandon")
            if self._next_layer != num_layers:
                raise ValueError(f"finish after {self._next_layer} of {num_layers} layers")
            self._closed = True
        if self._pair is not None:
            self._pair.push(self._outgoing, ("finish", frame))

    def abandon(self, reason: str) -> None:
        """Give the transfer up (request cancelled, model error); the pair stays usable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pair is not None:
            self._pair.push(self._outgoing, ("abandon", reason[:_MAX_REASON]))

    def done(self) -> bool:
        return self._outgoing.done.is_set()

    def wait(self) -> None:
        """Block until the receiver has everything, at most until the transfer's deadline.

        Raises TransferFailed (deadline, receiver gone, abandoned) or KVLayoutMismatch.
        Past the deadline the pair is torn down from here, whatever the pump is blocked on.
        """
        outgoing = self._outgoing
        if not outgoing.done.wait(max(outgoing.deadline - time.monotonic(), 0.0)):
            outgoing.settle(TransferFailed(f"transfer {self.seq} missed its deadline"))
            if self._pair is not None:
                self._pair.tear_down(f"transfer {self.seq} missed its deadline")
        if outgoing.error is not None:
            raise outgoing.error


class KVSender:
    """Prefill-side endpoint: sends blocks of its own caches to receivers named by tickets.

    kv_caches: per layer (key_cache, value_cache), see KVLayout.check_caches. `host` is
    the address this worker's gloo sockets bind to (CPU caches); NCCL picks its own.
    """

    def __init__(
        self,
        sender_id: str,
        layout: KVLayout,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        host: str,
    ) -> None:
        if not sender_id:
            raise ValueError("sender_id must be a non-empty string")
        self.sender_id = sender_id
        self.layout = layout
        self.blocks_per_group = layout.check_caches(kv_caches)
        self.kv_caches = [tuple(pair) for pair in kv_caches]
        self.device = kv_caches[0][0].device
        self.host = host
        self._lock = threading.Lock()
        self._pairs: dict[tuple[str, str], _SenderPair] = {}
        self._retired: dict[tuple[str, str], int] = {}
        # Highest torn-down generation per receiver: older tickets fail at once instead of
        # waiting for a rendezvous the receiver has given up.
        self._closed = False

    def begin(
        self, ticket: TransferTicket, src_block_ids: Sequence[Sequence[int]]
    ) -> KVSendTransfer:
        """Start the transfer of `ticket`; src_block_ids[g][i] holds logical_blocks[g][i].

        Never blocks on the network: pair setup (first use, or after a teardown) runs in
        the pair's thread. A stale or refused ticket gives a transfer that is already
        failed (its `wait` raises).
        """
        if ticket.sender_id != self.sender_id:
            raise ValueError(f"ticket is for sender {ticket.sender_id!r}, not {self.sender_id!r}")
        src_ids = self._check_blocks(ticket, src_block_ids)
        outgoing = _Outgoing(ticket, src_ids, time.monotonic() + ticket.timeout_s)
        key = (ticket.receiver_id, ticket.receiver_instance)
        with self._lock:
            if self._closed:
                raise RuntimeError("KVSender is closed")
            for stale_key, stale in list(self._pairs.items()):
                if stale.broken is not None:
                    self._retire(stale_key, stale)
            pair = self._pairs.get(key)
            if pair is not None and ticket.generation > pair.generation:
                pair.tear_down(f"superseded by generation {ticket.generation}")
                self._retire(key, pair)
                pair = None
            if pair is None and ticket.generation > self._retired.get(key, -1):
                pair = _SenderPair(self, ticket, outgoing.deadline)
                self._pairs[key] = pair
            if pair is None or ticket.generation < pair.generation:
                outgoing.settle(
                    TransferFailed(f"ticket of generation {ticket.generation} is stale")
                )
                return KVSendTransfer(self, None, outgoing)
            if not pair.submit(outgoing):
                outgoing.settle(TransferFailed(pair.broken or "pair torn down"))
                return KVSendTransfer(self, None, outgoing)
        return KVSendTransfer(self, pair, outgoing)

    def drop_receiver(self, receiver_id: str) -> None:
        """Tear down every pair with a receiver that is gone (registry says so); idempotent.

        An idle pair never fails on its own, so without this a pair with a decode worker
        that went away would keep its process group for the life of this worker.
        """
        with self._lock:
            dropped = [(key, pair) for key, pair in self._pairs.items() if key[0] == receiver_id]
            for key, pair in dropped:
                self._retire(key, pair)
        for _, pair in dropped:
            pair.tear_down(f"receiver {receiver_id!r} dropped")

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Tear down every pair; open transfers fail."""
        with self._lock:
            self._closed = True
            pairs = list(self._pairs.values())
            self._pairs.clear()
        tear_down_and_join(pairs, "sender closed", join_timeout_s)

    def _retire(self, key: tuple[str, str], pair: _SenderPair) -> None:
        self._retired[key] = max(self._retired.get(key, -1), pair.generation)
        if self._pairs.get(key) is pair:
            del self._pairs[key]

    def _check_blocks(
        self, ticket: TransferTicket, src_block_ids: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        groups = self.layout.num_groups
        if len(ticket.logical_blocks) != groups or len(src_block_ids) != groups:
            raise ValueError(
                f"ticket and src_block_ids need one entry per KV group ({groups}), got "
                f"{len(ticket.logical_blocks)} and {len(src_block_ids)}"
            )
        ids_per_group = []
        for g in range(groups):
            ids = list(src_block_ids[g])
            if len(ids) != ticket.num_blocks[g]:
                raise ValueError(
                    f"group {g}: {len(ids)} src_block_ids for {ticket.num_blocks[g]} wanted blocks"
                )
            if any(not 0 <= b < self.blocks_per_group[g] for b in ids):
                raise ValueError(
                    f"group {g}: src_block_ids must lie in [0, {self.blocks_per_group[g]})"
                )
            ids_per_group.append(torch.tensor(ids, dtype=torch.int64, device=self.device))
        return ids_per_group
