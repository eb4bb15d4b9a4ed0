"""Rank 0's side of an expert-parallel worker: it starts the followers, joins them in one
group, broadcasts every step, keeps them alive while idle, and notices when one is lost.

    start()    store on loopback -> spawn ranks 1..N-1 -> join group -> (caller loads
               rank 0's experts) -> wait_ready(): every follower loaded, or an error
    step()     lock; broadcast header + body; the caller's forward runs its collectives
    heartbeat  a thread: when no message went out for timeout_s / 3, broadcast HEARTBEAT
               (a follower waits for the next message at most timeout_s)
    failure    any failed collective or exited follower marks the worker failed for good:
               every later step() and check_alive() raises ExpertParallelFailure at once

Bounds: a dead follower (closed sockets) fails rank 0's next collective at once on gloo;
one that hangs fails it after timeout_s (the group's timeout). So a step never blocks
longer than timeout_s per collective. Health (check_alive) turns false at once for a
follower that exited, idle or not (its process is polled); a hung follower shows at the
next step, after timeout_s (a heartbeat broadcast from rank 0 may complete without it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.follower import READY_KEY, FollowerArgs, RankLoad
from tandem.workers.expert_parallel.group import host_rendezvous, join_group, leave_group
from tandem.workers.expert_parallel.kv_replica import blocks_body, broadcast_blocks
from tandem.workers.expert_parallel.step_messages import Command, StepInputs, header_tensor

_REAP_S = 2.0
# After a failed collective, how long to wait for a dying follower's exit code (it names
# the lost rank in the error).


class ExpertParallelFailure(RuntimeError):
    """The expert-parallel worker lost a rank (or its group); it cannot run steps any more."""


class FollowerSet:
    def __init__(self, ep: ExpertParallelConfig, device: torch.device) -> None:
        self.ep = ep
        self.device = device
        self.processes: list[subprocess.Popen] = []
        self._store: dist.TCPStore | None = None
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._beats = 0
        self._beat_done = threading.Condition()
        self.loaded: dict[int, RankLoad] = {}
        # rank -> the experts it reported loading (wait_ready), ranks 1..N-1

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        ep: ExpertParallelConfig,
        model_dir: str,
        device: torch.device,
        dtype: torch.dtype,
        kernels: str | None,
    ) -> FollowerSet:
        """Spawn ranks 1..N-1 and join the group as rank 0 (bounded by start_timeout_s)."""
        self = cls(ep, device)
        self._store, address = host_rendezvous(ep.start_timeout_s)
        try:
            for rank in range(1, ep.size):
                args = FollowerArgs(
                    address=address,
                    rank=rank,
                    model_dir=str(model_dir),
                    device=device.type,
                    dtype=str(dtype).removeprefix("torch."),
                    kernels=kernels,
                    ep=asdict(ep),
                )
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "tandem.workers.expert_parallel.follower",
                            args.to_json(),
                        ],
                        stdin=subprocess.DEVNULL,
                    )
                )
            join_group(self._store, 0, ep.size, device, ep.timeout_s)
        except BaseException:
            self._kill_all()
            raise
        return self

    def wait_ready(self) -> None:
        """Block until every follower loaded its experts (what each holds: `loaded`); raise
        if one exits or the start outlives start_timeout_s."""
        assert self._store is not None
        deadline = time.monotonic() + self.ep.start_timeout_s
        for rank in range(1, self.ep.size):
            key = READY_KEY.format(rank=rank)
            while True:
                self._raise_if_exited()
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill_all()
                    raise ExpertParallelFailure(
                        f"expert-parallel rank {rank} not ready within {self.ep.start_timeout_s} s"
                    )
                try:
                    self._store.wait([key], timedelta(seconds=min(1.0, left)))
                    break
                except (dist.DistStoreError, RuntimeError):
                    continue
            try:
                self.loaded[rank] = RankLoad.from_json(self._store.get(key).decode())
            except ValueError as err:
                self._kill_all()
                raise ExpertParallelFailure(f"expert-parallel rank {rank}: {err}") from None
        self._store = None  # the group is up; the rendezvous store is no longer needed
        self._heartbeat = threading.Thread(
            target=self._beat, name="tandem-ep-heartbeat", daemon=True
        )
        self._heartbeat.start()

    # ------------------------------------------------------------------ messages

    def send_init(self, block_size: int, blocks_per_group: Sequence[int]) -> None:
        """Tell the followers the KV cache shape to allocate (rank 0's, replicated)."""
        with self._guard("INIT"):
            body = torch.tensor(list(blocks_per_group), dtype=torch.int64, device=self.device)
            dist.broadcast(
                header_tensor([Command.INIT, block_size, body.numel()], self.device), src=0
            )
            dist.broadcast(body, src=0)

    def share_blocks(
        self,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        layer_groups: Sequence[int],
        block_ids: Sequence[Sequence[int]],
    ) -> None:
        """Copy blocks block_ids[g] of rank 0's cache (every layer of group g) to the
        followers' caches (kv_replica.py); between steps, like a step."""
        if not any(block_ids):
            return
        with self._guard("KV blocks"):
            body = blocks_body(block_ids)
            header = [Command.BLOCKS, len(block_ids), len(body) - len(block_ids)]
            dist.broadcast(header_tensor(header, self.device), src=0)
            dist.broadcast(torch.tensor(body, dtype=torch.int64, device=self.device), src=0)
            broadcast_blocks(kv_caches, layer_groups, block_ids, rank=0)

    @contextlib.contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        """Broadcast the step, then run the caller's forward (its collectives) under the
        same lock, so no heartbeat falls between a step's collectives."""
        with self._guard("step"):
            header, body = inputs.encode()
            dist.broadcast(header_tensor(header, self.device), src=0)
            dist.broadcast(torch.tensor(body, dtype=torch.int64, device=self.device), src=0)
            yield

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        with self._lock:
            self.check_alive()
            try:
                yield
            except Exception as err:
                self._fail(f"{what} failed: {err}")
                raise ExpertParallelFailure(self._failure) from err
            finally:
                self._last_send = time.monotonic()

    # ------------------------------------------------------------------ health

    def check_alive(self) -> None:
        """Raise ExpertParallelFailure when a follower exited or the group failed."""
        if self._failure is None:
            exited = self._exited()
            if exited:
                self._fail(exited)
        if self._failure is not None:
            raise ExpertParallelFailure(self._failure)

    def _exited(self) -> str | None:
        codes = [(i + 1, p.poll()) for i, p in enumerate(self.processes)]
        dead = [f"rank {rank} exited with code {code}" for rank, code in codes if code is not None]
        return "expert-parallel " + ", ".join(dead) if dead else None

    def _raise_if_exited(self) -> None:
        exited = self._exited()
        if exited:
            self._kill_all()
            raise ExpertParallelFailure(exited)

    def _fail(self, reason: str) -> None:
        if self._failure is not None:
            return
        # Name the lost rank when there is one: a dying follower's exit shows within moments.
        deadline = time.monotonic() + _REAP_S
        exited = self._exited()
        while exited is None and time.monotonic() < deadline and self.processes:
            time.sleep(0.05)
            exited = self._exited()
        self._failure = f"{exited}; {reason}" if exited else reason
        self._kill_all()

    def _beat(self) -> None:
        interval = self.ep.timeout_s / 3
        while not self._closed.wait(interval / 4):
            if self._failure is not None:
                return
            if time.monotonic() - self._last_send < interval:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a step is running: it is the heartbeat
            try:
                self.check_alive()
                dist.broadcast(header_tensor([Command.HEARTBEAT], self.device), src=0)
                self._last_send = time.monotonic()
                with self._beat_done:
                    self._beats += 1
                    self._beat_done.notify_all()
            except Exception as err:  # noted here, raised by the next step / health check
                self._fail(f"heartbeat failed: {err}")
                return
            finally:
                self._lock.release()

    def wait_heartbeats(self, count: int, timeout_s: float) -> bool:
        """Block until `count` heartbeats went out (diagnostics and tests); False on timeout."""
        with self._beat_done:
            return self._beat_done.wait_for(lambda: self._beats >= count, timeout_s)

    # ------------------------------------------------------------------ stop

    def close(self, timeout_s: float = 10.0) -> None:
        """STOP the followers (when the group still works), reap them, leave the group."""
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout_s)
        healthy = self._failure is None and self._exited() is None
        if healthy:
            with contextlib.suppress(Exception), self._lock:
                dist.broadcast(header_tensor([Command.STOP], self.device), src=0)
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if healthy or self.device.type != "cuda":
            # Gloo frees a failed group without talking to the peers; a failed NCCL group
            # is left as it is (its teardown can block on the dead ranks' kernels).
            leave_group()

    def _kill_all(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
