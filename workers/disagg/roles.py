"""Disaggregated prefill and decode: the worker roles over the engine and KV transfer.

    decode worker d                                   prefill worker p
    ───────────────                                   ────────────────
    add_remote_request: reserve blocks for the
      prompt, reuse d's cached prefix
    uncached part short? ──yes──> prefill here (conditional disaggregation)
    receiver.expect(p, blocks) -> ticket
    prefill(PrefillMessage + ticket) ───────────────> add_prefill_request: reuse p's own
                                                        cache, compute the rest; each layer's
    receiver.recv(ticket)  <════ KV, layer by layer ═══  blocks leave as soon as it is done
                           <════ first token ═══════════ (torch.distributed pair group)
    complete_remote(first token), decode on
    deadline passed / p died ──> fail_remote: prefill locally, same output

Everything that crosses a process boundary here is JSON (the messages below) or raw
tensor bytes (tandem.workers.disagg.transfer); nothing is pickled. Both workers run an
AsyncLLMEngine; the cluster layer wraps them in Ray Serve deployments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tandem.workers.control_plane import KVEvent, WorkerLoad
from tandem.workers.disagg.peers import PeerGone, PeerWatch
from tandem.workers.disagg.transfer import (
    KVLayout,
    KVLayoutMismatch,
    KVReceiver,
    KVSender,
    TransferFailed,
    TransferTicket,
)
from tandem.workers.engine.async_engine import AsyncLLMEngine
from tandem.workers.engine.llm_engine import EngineConfig
from tandem.workers.engine.outputs import RequestOutput, Timings, TokenLogprob, Usage
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.engine import build_engine
from tandem.workers.kv.block_pool import BlockRemoved, BlockStored

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DisaggConfig:
    # A prompt whose uncached part is shorter than this is prefilled on the decode worker:
    # the transfer would cost more than it saves.
    local_prefill_threshold: int = 32
    # Longest a decode worker waits for a prompt's KV before prefilling it itself.
    transfer_deadline_s: float = 10.0
    # How often a decode worker asks whether the prefill peers it waits on are gone
    # (dead, stopped, leaving; workers/disagg/peers.py): a gone peer costs a request this
    # long at most, not the transfer deadline.
    peer_check_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )
        if not self.transfer_deadline_s > 0:
            raise ValueError(f"transfer_deadline_s must be > 0, got {self.transfer_deadline_s}")
        if not self.peer_check_interval_s > 0:
            raise ValueError(f"peer_check_interval_s must be > 0, got {self.peer_check_interval_s}")


# ------------------------------------------------------------------------- messages


# Version 2 added `output_token_ids`; a message without "version" is version 1.
GENERATE_MESSAGE_VERSION = 2


@dataclass(frozen=True)
class GenerateMessage:
    """A request as the ingress hands it to a decode worker."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    output_token_ids: tuple[int, ...] = ()
    # Tokens already sampled and streamed for this request by a decode worker that then
    # failed: the worker resumes after them (stream migration, LLMEngine.add_request).

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": GENERATE_MESSAGE_VERSION,
                "request_id": self.request_id,
                "prompt_token_ids": list(self.prompt_token_ids),
                "params": dataclasses.asdict(self.params),
                "output_token_ids": list(self.output_token_ids),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> GenerateMessage:
        data = _object(text, "generate message")
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= GENERATE_MESSAGE_VERSION:
            # A newer ingress may ask for what this worker cannot do; never half-do it.
            raise ValueError(
                f"generate message version {version!r} is not supported "
                f"(1..{GENERATE_MESSAGE_VERSION})"
            )
        return cls(
            request_id=str(data["request_id"]),
            prompt_token_ids=tuple(int(t) for t in data["prompt_token_ids"]),
            params=SamplingParams.from_dict(data["params"]),
            output_token_ids=tuple(int(t) for t in data.get("output_token_ids", ())),
        )


@dataclass(frozen=True)
class PrefillMessage:
    """What a decode worker asks of a prefill worker: compute, sample, send per ticket."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    ticket: TransferTicket

    def to_json(self) -> str:
        return json.dumps(
            {
                "request_id": self.request_id,
                "prompt_token_ids": list(self.prompt_token_ids),
                "params": dataclasses.asdict(self.params),
                "ticket": self.ticket.to_json(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrefillMessage:
        data = _object(text, "prefill message")
        return cls(
            request_id=str(data["request_id"]),
            prompt_token_ids=tuple(int(t) for t in data["prompt_token_ids"]),
            params=SamplingParams.from_dict(data["params"]),
            ticket=TransferTicket.from_json(data["ticket"]),
        )


@dataclass(frozen=True)
class ServedInfo:
    """How a request was served, carried on its last delta."""

    decode_replica: str
    # Empty when the decode worker prefilled the prompt itself.
    prefill_replica: str = ""
    # "remote" (KV arrived by transfer), "local" (short or no prefill worker), "fallback"
    # (a transfer failed or missed its deadline).
    prefill_mode: str = "local"
    kv_transfer_s: float = 0.0
    # Prompt tokens the prefill worker found in its own prefix cache.
    prefill_cached_tokens: int = 0


def encode_delta(out: RequestOutput, served: ServedInfo | None) -> str:
    data = dataclasses.asdict(out)
    data["served"] = dataclasses.asdict(served) if served is not None else None
    return json.dumps(data)


def decode_delta(text: str) -> tuple[RequestOutput, ServedInfo | None]:
    data = _object(text, "delta")
    served = data.pop("served")
    timings = data.pop("timings")
    out = RequestOutput(
        request_id=data["request_id"],
        token_ids=tuple(data["token_ids"]),
        text_delta=data["text_delta"],
        finished=data["finished"],
        finish_reason=data["finish_reason"],
        usage=Usage(**data["usage"]),
        timings=Timings(**timings) if timings is not None else None,
        logprobs=tuple(
            TokenLogprob(lp["token_id"], lp["logprob"], tuple(tuple(t) for t in lp["top"]))
            for lp in data["logprobs"]
        ),
    )
    return out, ServedInfo(**served) if served is not None else None


def _object(text: str, what: str) -> dict:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a {what} must be a JSON object")
    return data


# -------------------------------------------------------------------------- workers


class RecentLatency:
    """Latencies of the last `window_s` seconds: their 90th percentile (0 with none) is
    what a worker reports to its pool's autoscaler as `ttft_s`; their count per second
    (with `add(amount)` as a weight, see `rate`), for `prompt_tokens_per_s`."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float) -> None:
        self._samples.append((self._clock(), value))
        self._prune()

    def rate(self) -> float:
        """The sum of the values added in the window, per second."""
        self._prune()
        return sum(v for _, v in self._samples) / self.window_s

    def p90(self) -> float:
        self._prune()
        values = sorted(v for _, v in self._samples)
        return values[int(0.9 * (len(values) - 1))] if values else 0.0

    def _prune(self) -> None:
        horizon = self._clock() - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()


class _Worker:
    """What both roles share: the engine, its KV layout, load and block events."""

    def __init__(self, engine: AsyncLLMEngine, replica_id: str, model_id: str) -> None:
        self.engine = engine
        self.replica_id = replica_id
        # arrival here to the first token, the time between a stream's tokens (decode),
        # and prompt tokens arriving: the autoscaler's latency and demand signals
        self.start_latency = RecentLatency()
        self.token_gaps = RecentLatency()
        self.prompt_arrivals = RecentLatency()
        core = engine.engine
        self.layout = KVLayout.from_config(
            core.config, model=model_id, dtype=core.dtype, block_size=core.engine_config.block_size
        )

    @staticmethod
    def _load_engine(
        model_dir: str | Path, engine_config: EngineConfig, ep: ExpertParallelConfig | None
    ) -> AsyncLLMEngine:
        # ep.size > 1: rank 0 here, ranks 1..N-1 processes it starts (workers/expert_parallel)
        return AsyncLLMEngine(build_engine(model_dir, engine_config, ep))

    async def check_health(self, timeout_s: float = 5.0) -> bool:
        """True when the engine loop answers a no-op within `timeout_s`."""
        return await self.engine.check_health(timeout_s)

    def metrics(self) -> dict[str, float]:
        return {
            **self.engine.metrics(),
            "ttft_s": self.start_latency.p90(),
            "itl_s": self.token_gaps.p90(),
            "prompt_tokens_per_s": self.prompt_arrivals.rate(),
        }

    def load(self) -> WorkerLoad:
        m = self.engine.metrics()
        return WorkerLoad(
            running=int(m["running"]),
            waiting=int(m["waiting"]),
            queued_prompt_tokens=int(m["queued_prompt_tokens"]),
            kv_usage=m["kv_usage"],
            updated_at=time.time(),
        )

    def kv_events(self) -> list[KVEvent]:
        """Blocks stored into / removed from the prefix cache since the last call."""
        return _to_control_plane(self.engine.call(lambda e: e.kv.drain_events()))

    def kv_snapshot(self) -> list[KVEvent]:
        """Every block the prefix cache holds now (for readers that lost events); pending
        events are dropped, the snapshot contains them."""
        return _to_control_plane(self.engine.call(lambda e: e.kv.snapshot()))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)


def _to_control_plane(events) -> list[KVEvent]:
    out = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append(KVEvent.stored(ev.group, ev.block_hash, ev.parent_hash, len(ev.token_ids)))
        elif isinstance(ev, BlockRemoved):
            out.append(KVEvent.removed(ev.group, ev.block_hash))
    return out


class PrefillWorker(_Worker):
    def __init__(self, engine: AsyncLLMEngine, replica_id: str, model_id: str, host: str):
        super().__init__(engine, replica_id, model_id)
        self.sender = KVSender(replica_id, self.layout, engine.engine.runner.kv_caches, host)
        engine.call(lambda e: e.attach_kv_sender(self.sender))

    @classmethod
    def create(
        cls,
        model_dir: str | Path,
        engine_config: EngineConfig,
        replica_id: str,
        host: str,
        ep: ExpertParallelConfig | None = None,
    ) -> PrefillWorker:
        return cls(
            cls._load_engine(model_dir, engine_config, ep), replica_id, Path(model_dir).name, host
        )

    async def prefill(self, request_json: str) -> str:
        """Run one prefill and push its KV; returns JSON {first_token, cached_tokens, prefill_s}.
        Cancelling it aborts the request and abandons its transfer."""
        msg = PrefillMessage.from_json(request_json)
        started = time.monotonic()
        self.prompt_arrivals.add(len(msg.prompt_token_ids))
        request_id = self.engine.call(
            lambda e: e.add_prefill_request(
                msg.prompt_token_ids, msg.params, f"prefill:{msg.request_id}", msg.ticket
            )
        )
        last = None
        async for out in self.engine.stream(request_id):
            last = out
        assert last is not None and last.token_ids, "a prefill ends with its first token"
        self.start_latency.add(time.monotonic() - started)
        return json.dumps(
            {
                "first_token": last.token_ids[0],
                "cached_tokens": last.usage.cached_tokens,
                "prefill_s": time.monotonic() - started,
            }
        )

    def close(self) -> None:
        self.sender.close()
        self.engine.shutdown()


Prefill = Callable[[str], Awaitable[str]]


class DecodeWorker(_Worker):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        replica_id: str,
        model_id: str,
        host: str,
        config: DisaggConfig,
        peers: PeerWatch | None = None,
    ):
        """peers: which prefill peers are gone (None: every peer is waited for up to the
        transfer deadline)."""
        super().__init__(engine, replica_id, model_id)
        self.config = config
        self.peers = peers
        self.receiver = KVReceiver(replica_id, self.layout, engine.engine.runner.kv_caches, host)
        self.fallbacks = 0
        self.transfers = 0
        self.transfer_seconds = 0.0
        self.transfer_bytes = 0

    @classmethod
    def create(
        cls,
        model_dir: str | Path,
        engine_config: EngineConfig,
        replica_id: str,
        host: str,
        config: DisaggConfig,
        peers: PeerWatch | None = None,
        ep: ExpertParallelConfig | None = None,
    ) -> DecodeWorker:
        engine = cls._load_engine(model_dir, engine_config, ep)
        return cls(engine, replica_id, Path(model_dir).name, host, config, peers)

    @property
    def transfer_endpoint(self) -> str:
        """Address of this worker's rendezvous store, published in the registry."""
        return self.receiver.address

    async def generate(
        self, request_json: str, prefill: Prefill | None = None, prefill_replica: str = ""
    ) -> AsyncIterator[str]:
        """Serve a request, streaming JSON deltas (encode_delta). With `prefill` (a call
        pinned to the prefill replica `prefill_replica`) the prompt's uncached part is
        computed there unless it is short; without, it is computed here."""
        msg = GenerateMessage.from_json(request_json)
        started = time.monotonic()
        self.prompt_arrivals.add(len(msg.prompt_token_ids))
        served = ServedInfo(decode_replica=self.replica_id)
        slot = None
        if prefill is not None and not msg.output_token_ids:
            # A resumed request is prefilled here: a prefill worker computes prompts only.
            slot = self.engine.call(
                lambda e: e.add_remote_request(msg.prompt_token_ids, msg.params, msg.request_id)
            )
        if slot is None:
            self.engine.call(
                lambda e: e.add_request(
                    msg.prompt_token_ids, msg.params, msg.request_id, msg.output_token_ids
                )
            )
        elif (
            len(msg.prompt_token_ids) - slot.num_cached_tokens < self.config.local_prefill_threshold
        ):
            self.engine.call(lambda e: e.fail_remote(msg.request_id))
        elif self.peers is not None and self.peers.is_gone(prefill_replica):
            # Known gone (dead, stopped, leaving): no call, no wait.
            self.fallbacks += 1
            self.engine.call(lambda e: e.fail_remote(msg.request_id))
            served = ServedInfo(self.replica_id, "", "fallback")
        else:
            served = await self._remote_prefill(msg, slot, prefill, prefill_replica)
        last = None
        async for out in self.engine.stream(msg.request_id):
            if out.token_ids:
                now = time.monotonic()
                if last is None:
                    self.start_latency.add(now - started)
                else:
                    # one sample a delta: its gap spread over the tokens it carries
                    self.token_gaps.add((now - last) / len(out.token_ids))
                last = now
            yield encode_delta(out, served if out.finished else None)

    async def _remote_prefill(self, msg, slot, prefill: Prefill, prefill_replica: str):
        """Have `prefill_replica` compute the prompt into the reserved blocks.

        The prefill call returns once the last layer is handed to its sender; the blocks
        land here meanwhile. Any failure (the call errs or outlives the deadline, the
        transfer breaks, the peer is found gone) leaves the blocks to a local prefill at
        once. Blocks are never freed
        while a transfer may still write into them: the ticket is cancelled first, or,
        once receiving, the receive is let run out (it is bounded by the deadline).
        """
        started = time.monotonic()
        deadline = self.config.transfer_deadline_s
        ticket = self.receiver.expect(
            prefill_replica, slot.dest_block_ids, slot.logical_blocks, deadline
        )
        request = PrefillMessage(msg.request_id, msg.prompt_token_ids, msg.params, ticket)
        call = asyncio.ensure_future(prefill(request.to_json()))
        receiving = None
        try:
            reply = json.loads(await asyncio.wait_for(self._reply(call, prefill_replica), deadline))
            receiving = asyncio.ensure_future(asyncio.to_thread(self.receiver.recv, ticket))
            result = await asyncio.shield(receiving)
        except asyncio.CancelledError:
            # The client went away: stop the prefill, close the transfer, free the blocks.
            call.cancel()
            await self._close_transfer(ticket, receiving)
            self.engine.abort(msg.request_id)
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the remote side falls back
            call.cancel()
            await self._close_transfer(ticket, receiving)
            self.fallbacks += 1
            self.engine.call(lambda e: e.fail_remote(msg.request_id))
            if not isinstance(err, TransferFailed | KVLayoutMismatch | TimeoutError | PeerGone):
                logger.warning("prefill on %s failed, prefilling locally: %r", prefill_replica, err)
            return ServedInfo(self.replica_id, "", "fallback")
        elapsed = time.monotonic() - started
        self.transfers += 1
        self.transfer_seconds += elapsed
        self.transfer_bytes += self._transfer_nbytes(slot)
        out = self.engine.call(lambda e: e.complete_remote(msg.request_id, result.first_token))
        self.engine.deliver(out)
        cached = int(reply.get("cached_tokens", 0))
        return ServedInfo(self.replica_id, prefill_replica, "remote", elapsed, cached)

    async def _reply(self, call: asyncio.Future, peer: str) -> str:
        """The prefill call's reply; PeerGone as soon as the peer is found gone."""
        if self.peers is None:
            return await call
        return await self.peers.race(call, peer)

    async def _close_transfer(self, ticket: TransferTicket, receiving) -> None:
        """After this, nothing more is written for `ticket` into this worker's cache."""
        if receiving is None:
            self.receiver.cancel(ticket)
        else:
            await asyncio.wait([receiving])
            if not receiving.cancelled():
                receiving.exception()  # retrieved: a failed receive is expected here

    def _transfer_nbytes(self, slot) -> int:
        """Bytes of K and V a transfer into `slot` moves."""
        blocks = sum(
            len(logical) * len(self.layout.layers_of_group(g))
            for g, logical in enumerate(slot.logical_blocks)
        )
        return 2 * blocks * self.layout.block_bytes

    def metrics(self) -> dict[str, float]:
        m = super().metrics()
        m.update(
            transfers=float(self.transfers),
            transfer_seconds=self.transfer_seconds,
            transfer_bytes=float(self.transfer_bytes),
            fallbacks=float(self.fallbacks),
        )
        return m

    def close(self) -> None:
        self.receiver.close()
        self.engine.shutdown()
