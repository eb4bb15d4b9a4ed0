"""Decode side of KV transfer: say which blocks to fill, receive them, never wait past a deadline.

    receiver = KVReceiver("decode-0", layout, kv_caches, host="10.0.0.5")
    receiver.address                        # "10.0.0.5:41234", published in the registry
    ticket = receiver.expect("prefill-3", dest_block_ids, logical_blocks, timeout_s=5.0)
    ... send ticket.to_json() with the prefill request ...
    result = receiver.recv(ticket)          # TransferResult, or TransferFailed at the deadline

Each ticket must end in exactly one `recv` or `cancel`.

Per pair generation one pump thread does every blocking step (setup, receives, unpacking)
in `seq` order; callers only wait on an event with a timeout, so the deadline is enforced
from outside the backend call: when it passes, `recv` tears the pair down (aborting an
NCCL communicator stuck on a dead peer) and raises TransferFailed; the next `expect` for
that sender starts a new generation (new rendezvous prefix, new group).

Cache writes stop when a transfer ends: the pump unpacks a layer only while holding the
transfer's lock and only if the transfer is still open, and `recv` / `cancel` close it
under that lock and order the caller's CUDA stream after the last unpack. So after either
returns, no late write from this transfer can land in blocks the engine reuses (for a
local prefill fallback, or for another request).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence

import torch

from tandem.workers.disagg.transfer.layout import KVLayout, KVLayoutMismatch
from tandem.workers.disagg.transfer.pack import packed_nbytes, unpack_layer
from tandem.workers.disagg.transfer.pair import (
    RECEIVER_RANK,
    PairGroup,
    PumpedPair,
    host_store,
    tear_down_and_join,
)
from tandem.workers.disagg.transfer.protocol import (
    FRAME_BYTES,
    PROTOCOL_VERSION,
    TAG_FIRST_LAYER,
    TAG_FOOTER,
    TAG_HEADER,
    TransferFailed,
    TransferResult,
    TransferTicket,
    decode_frame,
)


class _Incoming:
    """One expected transfer: where its blocks go and how it ended."""

    def __init__(
        self, seq: int, dest_ids: list[torch.Tensor], num_blocks: tuple[int, ...], deadline: float
    ) -> None:
        self.seq = seq
        self.dest_ids = dest_ids  # per group: [n_g] int64 on the cache device
        self.num_blocks = num_blocks
        self.deadline = deadline
        self.lock = threading.Lock()  # held by the pump while it writes into the cache
        self.done = threading.Event()
        self.result: TransferResult | None = None
        self.error: BaseException | None = None
        self.last_write: torch.cuda.Event | None = None

    def settle(
        self, result: TransferResult | None = None, error: BaseException | None = None
    ) -> None:
        """End the transfer (first call wins); no cache write happens after this."""
        with self.lock:
            if not self.done.is_set():
                self.result, self.error = result, error
                self.done.set()

    def fence(self) -> None:
        """Order the caller's current CUDA stream after every cache write of this transfer."""
        with self.lock:
            if self.last_write is not None:
                torch.cuda.current_stream(self.last_write.device).wait_event(self.last_write)


class _ReceiverPair(PumpedPair):
    """One generation of the pair with one sender, with the thread that receives on it."""

    def __init__(self, owner: KVReceiver, sender_id: str, generation: int) -> None:
        self.owner = owner
        self.sender_id = sender_id
        self.generation = generation
        self.prefix = f"tandem/kv/{owner.instance}/{sender_id}/{generation}/"
        self.cond = threading.Condition()
        self.incoming: dict[int, _Incoming] = {}
        self.next_seq = 0
        self.broken: str | None = None
        self.group: PairGroup | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"kv-recv-{sender_id}-{generation}", daemon=True
        )

    def add(
        self, dest_ids: list[torch.Tensor], num_blocks: tuple[int, ...], deadline: float
    ) -> _Incoming | None:
        """Register the next transfer; None if the pair is already torn down."""
        with self.cond:
            if self.broken is not None:
                return None
            incoming = _Incoming(self.next_seq, dest_ids, num_blocks, deadline)
            self.incoming[incoming.seq] = incoming
            self.next_seq += 1
            self.cond.notify_all()
        if not self.thread.is_alive() and incoming.seq == 0:
            self.thread.start()
        return incoming

    def _open_transfers(self) -> list:
        return list(self.incoming.values())

    def _run(self) -> None:
        device = self.owner.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        name = f"pair with {self.sender_id!r} (generation {self.generation})"
        try:
            seq = 0
            while (incoming := self._wait_for(seq)) is not None:
                if self.group is None:
                    self._setup(incoming.deadline)
                self._receive(incoming)
                with self.cond:
                    self.incoming.pop(seq, None)
                seq += 1
        except KVLayoutMismatch as e:
            self.tear_down(f"{name} refused: {e}", mismatch=True)
        except TransferFailed as e:
            self.tear_down(f"{name} broken: {e}")
        except Exception as e:  # any other fault of this pair must fail its transfers, not hang
            self.tear_down(f"{name} broken: {type(e).__name__}: {e}")
        finally:
            with self.cond:
                self.group = None  # last reference: dropping it closes gloo's connections

    def _wait_for(self, seq: int) -> _Incoming | None:
        with self.cond:
            while self.broken is None and seq not in self.incoming:
                self.cond.wait()
            return None if self.broken is not None else self.incoming[seq]

    def _setup(self, deadline: float) -> None:
        owner = self.owner
        group = PairGroup.build(
            owner.store,
            self.prefix,
            RECEIVER_RANK,
            owner.layout,
            owner.device,
            owner.host,
            deadline,
        )
        with self.cond:
            if self.broken is None:
                self.group = group
                return
        group.abort()
        raise TransferFailed(self.broken)

    def _receive(self, incoming: _Incoming) -> None:
        group = self.group
        assert group is not None
        layout, device = self.owner.layout, self.owner.device
        deadline = incoming.deadline

        header_buf = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device)
        group.wait(group.recv(header_buf, TAG_HEADER), deadline, self.stopped)
        header = decode_frame(header_buf)
        expected = (PROTOCOL_VERSION, self.generation, incoming.seq, list(incoming.num_blocks))
        got = (
            header.get("version"),
            header.get("generation"),
            header.get("seq"),
            header.get("num_blocks"),
        )
        if got != expected:
            raise TransferFailed(
                f"protocol error: header (version, generation, seq, blocks) {got}, "
                f"expected {expected}"
            )
        if header.get("status") == "abandoned":
            incoming.settle(
                error=TransferFailed(
                    f"sender abandoned transfer {incoming.seq}: {header.get('reason')}",
                    pair_broken=False,
                )
            )
            return
        if header.get("status") != "ok":
            raise TransferFailed(f"protocol error: header status {header.get('status')!r}")

        # Post every receive now: NCCL then streams the layers back to back as they come.
        caches = self.owner.kv_caches
        wanted = [incoming.num_blocks[g] for g in layout.layer_groups]  # blocks per layer
        layers = [i for i in range(layout.num_layers) if wanted[i]]
        sizes = [packed_nbytes(caches[i][0], wanted[i]) for i in layers]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        posted = []
        offset = 0
        for layer, size in zip(layers, sizes, strict=True):
            view = flat[offset : offset + size]
            posted.append((layer, view, group.recv(view, TAG_FIRST_LAYER + layer)))
            offset += size
        footer_buf = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device)
        footer_work = group.recv(footer_buf, TAG_FOOTER)

        for layer, view, work in posted:
            group.wait(work, deadline, self.stopped)
            with incoming.lock:
                if incoming.done.is_set():
                    continue  # cancelled or timed out: drain the wire, write nothing
                key_cache, value_cache = caches[layer]
                ids = incoming.dest_ids[layout.layer_groups[layer]]
                unpack_layer(view, key_cache, value_cache, ids)
                if device.type == "cuda":
                    incoming.last_write = torch.cuda.Event()
                    incoming.last_write.record()
        group.wait(footer_work, deadline, self.stopped)
        footer = decode_frame(footer_buf)
        if footer.get("seq") != incoming.seq:
            raise TransferFailed(
                f"protocol error: footer of seq {footer.get('seq')}, expected {incoming.seq}"
            )
        if footer.get("status") == "ok" and isinstance(footer.get("first_token"), int):
            metadata = footer.get("metadata")
            result = TransferResult(
                incoming.seq, footer["first_token"], metadata if isinstance(metadata, dict) else {}
            )
            incoming.settle(result=result)
        else:
            incoming.settle(
                error=TransferFailed(
                    f"sender failed transfer {incoming.seq}: {footer.get('reason')}",
                    pair_broken=False,
                )
            )


class KVReceiver:
    """Decode-side endpoint: hosts the rendezvous store and receives into its own caches.

    kv_caches: per layer (key_cache, value_cache), see KVLayout.check_caches; blocks land
    there in place. CUDA caches move over NCCL, CPU caches over gloo.
    """

    def __init__(
        self,
        receiver_id: str,
        layout: KVLayout,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        host: str,
        port: int = 0,
        store_timeout_s: float = 30.0,
    ) -> None:
        if not receiver_id:
            raise ValueError("receiver_id must be a non-empty string")
        self.receiver_id = receiver_id
        self.layout = layout
        self.blocks_per_group = layout.check_caches(kv_caches)
        self.kv_caches = [tuple(pair) for pair in kv_caches]
        self.device = kv_caches[0][0].device
        self.host = host
        self.instance = secrets.token_hex(8)
        self.store, self.address = host_store(host, port, store_timeout_s)
        self._lock = threading.Lock()
        self._pairs: dict[str, _ReceiverPair] = {}
        self._generations: dict[str, int] = {}
        self._open: dict[tuple[str, int, int], tuple[_ReceiverPair, _Incoming]] = {}
        self._closed = False

    def expect(
        self,
        sender_id: str,
        dest_block_ids: Sequence[Sequence[int]],
        logical_blocks: Sequence[Sequence[int]],
        timeout_s: float,
    ) -> TransferTicket:
        """Register a transfer from `sender_id` into `dest_block_ids`; returns its ticket.

        dest_block_ids[g][i]: this worker's physical block (KV group g) receiving the
        sender's block for logical index logical_blocks[g][i]. The deadline starts now.
        """
        num_blocks = self._check_blocks(dest_block_ids, logical_blocks)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        dest_ids = [
            torch.tensor(list(ids), dtype=torch.int64, device=self.device) for ids in dest_block_ids
        ]
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise RuntimeError("KVReceiver is closed")
            while True:
                pair = self._pairs.get(sender_id)
                if pair is None or pair.broken is not None:
                    generation = self._generations.get(sender_id, -1) + 1
                    self._generations[sender_id] = generation
                    pair = _ReceiverPair(self, sender_id, generation)
                    self._pairs[sender_id] = pair
                incoming = pair.add(dest_ids, num_blocks, deadline)
                if incoming is not None:
                    break
            self._open[(sender_id, pair.generation, incoming.seq)] = (pair, incoming)
        return TransferTicket(
            receiver_id=self.receiver_id,
            receiver_instance=self.instance,
            store_address=self.address,
            sender_id=sender_id,
            generation=pair.generation,
            seq=incoming.seq,
            logical_blocks=tuple(tuple(int(b) for b in g) for g in logical_blocks),
            timeout_s=float(timeout_s),
        )

    def recv(self, ticket: TransferTicket) -> TransferResult:
        """Wait for the transfer until its deadline; its blocks are then in the cache.

        Raises TransferFailed (deadline, peer failure, sender abandon) or KVLayoutMismatch
        (the sender's layout differs). On return or raise, the caller's CUDA stream is
        ordered after every write of this transfer.
        """
        pair, incoming = self._take(ticket)
        if not incoming.done.wait(max(incoming.deadline - time.monotonic(), 0.0)):
            # Close the transfer before tearing down, so the pump writes nothing more.
            incoming.settle(
                error=TransferFailed(
                    f"transfer {ticket.seq} from {ticket.sender_id!r} missed its deadline "
                    f"of {ticket.timeout_s:g} s"
                )
            )
            pair.tear_down(f"transfer {ticket.seq} missed its deadline")
        incoming.fence()
        if incoming.error is not None:
            raise incoming.error
        assert incoming.result is not None
        return incoming.result

    def cancel(self, ticket: TransferTicket) -> None:
        """Give up a transfer: nothing more is written for it; the pair stays usable.

        Its data is still drained from the wire in order; if the sender never sends it,
        the pair is torn down at the transfer's deadline.
        """
        _, incoming = self._take(ticket)
        incoming.settle(error=TransferFailed("cancelled by the receiver", pair_broken=False))
        incoming.fence()

    def generation(self, sender_id: str) -> int | None:
        """Generation of the current pair with `sender_id` (None before the first ticket)."""
        with self._lock:
            return self._generations.get(sender_id)

    def drop_sender(self, sender_id: str) -> None:
        """Tear down the pair with a sender that is gone (registry says so); idempotent.

        Frees its process group now instead of at its next failure.
        """
        with self._lock:
            pair = self._pairs.pop(sender_id, None)
        if pair is not None:
            pair.tear_down(f"sender {sender_id!r} dropped")

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Tear down every pair; open transfers fail and later `expect` calls raise."""
        with self._lock:
            self._closed = True
            pairs = list(self._pairs.values())
            self._pairs.clear()
        tear_down_and_join(pairs, "receiver closed", join_timeout_s)

    def _take(self, ticket: TransferTicket) -> tuple[_ReceiverPair, _Incoming]:
        key = (ticket.sender_id, ticket.generation, ticket.seq)
        with self._lock:
            entry = self._open.pop(key, None)
        if entry is None or ticket.receiver_instance != self.instance:
            raise ValueError(f"unknown or already ended ticket {key}")
        return entry

    def _check_blocks(
        self, dest_block_ids: Sequence[Sequence[int]], logical_blocks: Sequence[Sequence[int]]
    ) -> tuple[int, ...]:
        groups = self.layout.num_groups
        if len(dest_block_ids) != groups or len(logical_blocks) != groups:
            raise ValueError(
                f"dest_block_ids and logical_blocks need one entry per KV group ({groups}), "
                f"got {len(dest_block_ids)} and {len(logical_blocks)}"
            )
        for g in range(groups):
            ids, logical = list(dest_block_ids[g]), list(logical_blocks[g])
            if len(ids) != len(logical):
                raise ValueError(
                    f"group {g}: {len(ids)} dest_block_ids but {len(logical)} logical_blocks"
                )
            if any(not 0 <= b < self.blocks_per_group[g] for b in ids):
                raise ValueError(
                    f"group {g}: dest_block_ids must lie in [0, {self.blocks_per_group[g]})"
                )
            if len(set(ids)) != len(ids):
                raise ValueError(f"group {g}: dest_block_ids must be distinct")
            if any(b < 0 for b in logical):
                raise ValueError(f"group {g}: logical_blocks must be non-negative")
        return tuple(len(g) for g in dest_block_ids)
