"""The 2-rank process group of one (prefill, decode) pair, and the store it meets through.

Rendezvous, per pair generation:

    decode worker (rank 1)                          prefill worker (rank 0)
    TCPStore server on its own host:port            TCPStore client to that "host:port"
        (one per KVReceiver, shared by its pairs)       (from the ticket)
    PrefixStore("tandem/kv/<instance>/<sender>/<generation>/")    same prefix
      layout/1 <- own KVLayout JSON                   layout/0 <- own KVLayout JSON
      wait layout/0, compare                          wait layout/1, compare
      pg/...  ProcessGroupGloo | ProcessGroupNCCL(PrefixStore("pg/", ...), rank, 2, ...)

No default (world) group is involved: each pair owns its backend object, so one process
can hold any number of pairs and drop one without touching the others. A torn-down pair
is never reused; the next generation gets a new prefix and a new group.

Binding: `TCPStore(host, port, is_master=True)` listens on every interface whatever
`host` says (its libuv server binds the wildcard address, checked on torch 2.13). We bind
the listening socket ourselves to the chosen address and hand it over through
`master_listen_fd` (supported by the libuv backend since torch 2.8), so the store is only
reachable on that address. Gloo binds its own sockets to the `host` given here
(`create_device(hostname=...)`); NCCL's bootstrap picks its interface from
`NCCL_SOCKET_IFNAME`. The store has no authentication: the random receiver instance in
every key (known only from tickets) keeps peers that never saw a ticket from meeting a
pair, and a NetworkPolicy must keep other pods off the port. Nothing read from the store
or the wire is unpickled: layouts and frames are JSON.

Deadlines: every blocking step here is bounded by the transfer's deadline, and it runs in
a pair's own thread while the API caller only waits on an event with a timeout, so the
deadline holds whatever the backend does. NCCL work is polled (`Work.is_completed()`),
so a teardown by another thread ends the wait within 0.2 ms; `abort` aborts the NCCL
communicator, which releases kernels stuck on a dead peer (NCCL hangs rather than fails
there). Gloo point-to-point work completes only inside `Work.wait`, which takes the
remaining time as timeout; gloo's `abort` / `shutdown` do not release a pending receive
(checked on torch 2.13), so a gloo pump can stay blocked until its deadline, but a dead
peer shows at once as a closed connection.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.workers.disagg.transfer.layout import KVLayout, KVLayoutMismatch
from tandem.workers.disagg.transfer.protocol import TransferFailed, format_address, parse_address

SENDER_RANK = 0
RECEIVER_RANK = 1
_NCCL_WATCHDOG = timedelta(minutes=30)
# NCCL's own watchdog may tear the whole process down when an operation outlives this,
# so it is set far beyond any transfer deadline: our deadlines abort first.
_POLL_FIRST_S = 2e-5
_POLL_MAX_S = 2e-4
# Completion polling backs off from 20 us to 200 us: a layer's arrival is noticed within
# 0.2 ms, and an idle wait costs a few thousand cheap wake-ups a second.

Stopped = Callable[[], str | None]
# Returns why the pair was torn down by another thread, or None while it is alive.


def host_store(host: str, port: int, timeout_s: float) -> tuple[dist.TCPStore, str]:
    """Start a TCPStore server listening on `host` only; returns it and its "host:port"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound_port = sock.getsockname()[1]
        store = dist.TCPStore(
            host,
            bound_port,
            None,
            True,
            timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns and closes the descriptor from now on
    return store, format_address(host, bound_port)


def connect_store(address: str, timeout_s: float) -> dist.TCPStore:
    """Client of a receiver's rendezvous store at "host:port"."""
    host, port = parse_address(address)
    try:
        return dist.TCPStore(host, port, None, False, timedelta(seconds=max(timeout_s, 1e-3)))
    except (RuntimeError, dist.DistStoreError) as e:
        raise TransferFailed(f"cannot reach rendezvous store {address}: {e}") from e


class PairGroup:
    """One generation of a pair: a 2-rank gloo or NCCL group and the device it moves data on.

    The backend follows the device of the KV caches: CUDA -> NCCL, CPU -> gloo; the code
    path above this class is the same for both.
    """

    def __init__(self, backend: dist.ProcessGroup, device: torch.device, rank: int) -> None:
        self._backend = backend
        self.device = device
        self.rank = rank
        self._aborted = False

    @classmethod
    def build(
        cls,
        store: dist.Store,
        prefix: str,
        rank: int,
        layout: KVLayout,
        device: torch.device,
        host: str,
        deadline: float,
    ) -> PairGroup:
        """Meet the peer under `prefix`, refuse it if its layout differs, build the group.

        Raises KVLayoutMismatch (naming the fields) or TransferFailed (peer absent by the
        deadline). Both ends run this concurrently; gloo's constructor connects to the peer,
        NCCL's communicator is created at the first send/receive.
        """
        pair_store = dist.PrefixStore(prefix, store)
        _exchange_layouts(pair_store, rank, layout, deadline)
        group_store = dist.PrefixStore("pg/", pair_store)
        remaining = timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
        try:
            if device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = _NCCL_WATCHDOG
                backend = dist.ProcessGroupNCCL(group_store, rank, 2, options)
            else:
                options = dist.ProcessGroupGloo._Options()
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
                options._timeout = remaining
                options._threads = 2
                backend = dist.ProcessGroupGloo(group_store, rank, 2, options)
        except (RuntimeError, dist.DistStoreError) as e:
            raise TransferFailed(f"pair group setup failed: {e}") from e
        return cls(backend, device, rank)

    def send(self, tensor: torch.Tensor, tag: int) -> dist.Work:
        """Start sending a contiguous tensor to the peer; returns at once."""
        return self._backend.send([tensor], 1 - self.rank, tag)

    def recv(self, tensor: torch.Tensor, tag: int) -> dist.Work:
        """Start receiving into a contiguous tensor from the peer; returns at once."""
        return self._backend.recv([tensor], 1 - self.rank, tag)

    def wait(self, work: dist.Work, deadline: float, stopped: Stopped) -> None:
        """Return once `work` completed; TransferFailed on deadline, teardown or peer error.

        After a CUDA receive completes, the calling thread's current stream is ordered
        after it (Work.wait), so kernels it enqueues next see the data.
        """
        if self.device.type == "cuda":
            # NCCL work completes on the GPU; poll its end event so that a teardown by
            # another thread or the deadline ends the wait within one poll interval.
            delay = _POLL_FIRST_S
            while not work.is_completed():
                reason = stopped()
                if reason is not None:
                    raise TransferFailed(reason)
                now = time.monotonic()
                if now >= deadline:
                    raise TransferFailed("transfer deadline exceeded")
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, _POLL_MAX_S)
            timeout = None  # complete: wait() only orders the current stream after it
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferFailed("transfer deadline exceeded")
            # Gloo point-to-point work only completes inside wait(), so it is waited for
            # here with the deadline as timeout (a zero timeout would mean none at all).
            timeout = timedelta(seconds=max(remaining, 1e-3))
        try:
            work.wait() if timeout is None else work.wait(timeout)
        except RuntimeError as e:
            if time.monotonic() >= deadline:
                raise TransferFailed("transfer deadline exceeded") from e
            raise TransferFailed(f"peer failed: {e}") from e
        reason = stopped()
        if reason is not None:
            # An aborted NCCL operation can look complete; its data is not to be trusted.
            raise TransferFailed(reason)

    def abort(self) -> None:
        """Tear the group down from any thread; idempotent. Pending NCCL kernels end."""
        if self._aborted:
            return
        self._aborted = True
        if self.device.type == "cuda":
            try:
                self._backend.abort()
            except RuntimeError:
                pass  # already failed or shut down: nothing left to release


def _exchange_layouts(store: dist.Store, rank: int, layout: KVLayout, deadline: float) -> None:
    store.set(f"layout/{rank}", layout.to_json())
    peer_key = f"layout/{1 - rank}"
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError("no time left")
        store.wait([peer_key], timedelta(seconds=remaining))
        peer_json = store.get(peer_key).decode()
    except (RuntimeError, dist.DistStoreError, TimeoutError) as e:
        raise TransferFailed(f"peer did not join pair setup before the deadline: {e}") from e
    layout.check_compatible(KVLayout.from_json(peer_json))


class PumpedPair:
    """What one generation of a sender's or a receiver's pair shares: a condition guarding
    its state, the reason it broke (None while healthy), its process group and the pump
    thread. Subclasses set those in __init__ and list their unfinished transfers (objects
    with `settle(error=...)`) in `_open_transfers`, called with the condition held."""

    cond: threading.Condition
    broken: str | None
    group: PairGroup | None
    thread: threading.Thread

    def _open_transfers(self) -> list:
        raise NotImplementedError

    def stopped(self) -> str | None:
        return self.broken

    def tear_down(self, reason: str, mismatch: bool = False) -> None:
        """Fail every open transfer of this generation and abort the group; idempotent."""
        with self.cond:
            if self.broken is not None:
                return
            self.broken = reason
            pending = self._open_transfers()
            group = self.group
            self.cond.notify_all()
        for transfer in pending:
            transfer.settle(error=KVLayoutMismatch(reason) if mismatch else TransferFailed(reason))
        if group is not None:
            group.abort()


def tear_down_and_join(pairs: Sequence, reason: str, join_timeout_s: float) -> None:
    """Tear down pairs (sender or receiver side) and wait for their pump threads.

    Waiting lets the pumps drop their groups before the caller returns: a process that
    exits while a backend is being destroyed in another thread aborts. A gloo receive in
    flight cannot be interrupted, so a pump may take until its transfer's deadline.
    """
    for pair in pairs:
        pair.tear_down(reason)
    end = time.monotonic() + join_timeout_s
    for pair in pairs:
        if pair.thread.is_alive():
            pair.thread.join(max(end - time.monotonic(), 0.0))
