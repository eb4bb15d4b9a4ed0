"""A grpc.aio server (and the HTTP app) in the test process, for tests that talk to it
over loopback.

    EventLoopThread   an asyncio loop on a thread: servers run there; the tests call them
                      through blocking clients, as a real client process would
    HttpServer        the OpenAI-compatible HTTP app served by uvicorn on that loop
    FaultHooks        faults injected into a real LLMEngine (paused, slowed, stuck, failing)
    new_backend()     the in-process backend on a real engine, with its fault hooks

Used by tests/test_grpc_api.py, tests/test_grpc_standard.py, tests/test_input_limits.py,
tests/test_http_api.py, tests/test_loadtest.py and bench/hostile_input.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import uvicorn

from tandem.cluster.api.backend import GenerationBackend, InProcessBackend, InProcessBackendConfig
from tandem.cluster.api.server import ServerConfig, TandemServer
from tandem.cluster.http.app import HttpConfig, build_http_app
from tandem.workers.engine.async_engine import AsyncLLMEngine
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine

MAX_MODEL_LEN = 256
ENGINE_CONFIG = EngineConfig(
    device="cpu",
    dtype="float32",
    block_size=8,
    kv_cache_tokens=2048,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=MAX_MODEL_LEN,
)


class EventLoopThread:
    """An asyncio loop on a thread: servers run there, tests talk to them through the
    blocking client from the test thread, as a real client process would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_server(self, backend: GenerationBackend, **config) -> TandemServer:
        return self.run(TandemServer.start(backend, ServerConfig(port=0, **config)))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class HttpServer:
    """The HTTP app served by uvicorn on the test's event loop thread."""

    def __init__(self, loop_thread: EventLoopThread, backend, config: HttpConfig) -> None:
        self._lt = loop_thread
        app = build_http_app(backend, config)
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self._task = asyncio.run_coroutine_threadsafe(self._server.serve(), loop_thread.loop)
        deadline = time.monotonic() + 30
        while not (self._server.started or self._task.done()) and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the start, bounded
        assert self._server.started, self._task.result()
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._task.result(30)


class FaultHooks:
    """Faults injected into a real LLMEngine by wrapping two of its methods on the
    instance (the AsyncLLMEngine thread calls them each loop turn):

    - paused: `has_unfinished` answers False, so admitted requests wait unscheduled;
    - step_delay_s: each step sleeps first, so a long request stays in flight;
    - stuck: `has_unfinished` blocks (the engine thread hangs holding its lock);
    - fail: `step` raises (the engine thread dies).
    """

    def __init__(self, llm: LLMEngine) -> None:
        self.paused = threading.Event()
        self.stuck = threading.Event()
        self.unstick = threading.Event()
        self.fail = threading.Event()
        self.step_delay_s = 0.0
        real_has_unfinished, real_step = llm.has_unfinished, llm.step

        def has_unfinished() -> bool:
            if self.stuck.is_set():
                self.unstick.wait()
            return not self.paused.is_set() and real_has_unfinished()

        def step():
            if self.fail.is_set():
                raise RuntimeError("injected engine failure")
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            return real_step()

        llm.has_unfinished = has_unfinished  # type: ignore[method-assign]
        llm.step = step  # type: ignore[method-assign]


def new_backend(model_dir: Path, **config) -> tuple[InProcessBackend, LLMEngine, FaultHooks]:
    llm = LLMEngine.from_model_dir(model_dir, ENGINE_CONFIG)
    hooks = FaultHooks(llm)
    backend = InProcessBackend(AsyncLLMEngine(llm), InProcessBackendConfig(**config))
    return backend, llm, hooks
