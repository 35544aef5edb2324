"""The HTTP server: KServe v2 routes over FastAPI/uvicorn, one ModelWorker per model.

Routes (``{v}``: optional ``/versions/1``): ``GET /v2``, ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/{name}{v}``, ``/v2/models/{name}{v}/ready``,
``/v2/models/{name}{v}/config``, ``POST /v2/models/{name}{v}/infer``, ``GET /metrics``.

Safety: binds 127.0.0.1 unless told otherwise; with a token, every route but
the two health probes needs ``Authorization: Bearer <token>``; bodies over
``max_request_bytes`` get 413 (checked before and while reading); on
shutdown (SIGINT/SIGTERM, or :meth:`ServerThread.stop`) the server stops
accepting, answers new requests on open connections 503, runs everything
queued without waiting for more, and answers every in-flight request before
it exits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek.serving.batcher import ModelWorker, Outcome, Rejected
from deepseek.serving.metrics import CONTENT_TYPE_LATEST, ServingMetrics
from deepseek.serving.policy import BatchConfig
from deepseek.serving.protocol import (
    ModelSignature,
    ProtocolError,
    decode_body,
    encode_infer_response,
    model_config,
    model_metadata,
    parse_infer_request,
)

log = logging.getLogger(__name__)

_STATUS = {"deadline_refused": 504, "unavailable": 503, "queue_full": 429, "error": 500}
_OFFLOAD_BYTES = 256 << 10  # bodies above this are parsed/encoded off the event loop
_REASON = {"deadline_refused": "deadline", "unavailable": "draining", "queue_full": "queue_full"}


@dataclass
class ServeConfig:
    """Server settings (the ``deepseek serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_queue_delay_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    pad_batch: bool = True             # pad batches up to a batch bucket (the engine's shapes)
    batch_buckets: tuple[int, ...] = ()  # default: powers of two, preferred sizes, max size
    length_buckets: tuple[int, ...] = ()  # padded lengths of variable-length dims
    queue_limit: int = 256             # per model
    deadline_margin_ms: float = 5.0    # kept free before deadlines for wake-up and the reply
    deadline_aware: bool = True        # False: the fixed-delay baseline (Triton's way)
    token: str | None = None
    max_request_bytes: int = 64 << 20
    drain_timeout_s: float = 30.0
    warmup: bool = True

    def batch_config(self, batchable: bool) -> BatchConfig:
        if not batchable:  # no symbolic batch dim: one request at a time
            return BatchConfig(max_batch_size=1, max_queue_delay=0.0,
                               margin=self.deadline_margin_ms / 1000.0)
        return BatchConfig(max_batch_size=self.max_batch_size,
                           margin=self.deadline_margin_ms / 1000.0,
                           deadline_aware=self.deadline_aware,
                           max_queue_delay=self.max_queue_delay_ms / 1000.0,
                           preferred_batch_sizes=tuple(self.preferred_batch_sizes),
                           batch_buckets=self.buckets() if self.pad_batch else ())

    def buckets(self) -> tuple[int, ...]:
        """The batch sizes the engine runs (each gets its own plan, built at warm-up):
        ``batch_buckets`` if given, else powers of two, the preferred sizes and the max."""
        if self.batch_buckets:
            return tuple(sorted({b for b in self.batch_buckets if b <= self.max_batch_size}
                                | {self.max_batch_size}))
        powers = {1 << k for k in range(self.max_batch_size.bit_length())
                  if 1 << k <= self.max_batch_size}
        return tuple(sorted(powers | set(self.preferred_batch_sizes) | {self.max_batch_size}))


@dataclass
class ServingState:
    """What the routes share: the workers by model name, metrics and settings."""

    config: ServeConfig
    workers: dict[str, ModelWorker] = field(default_factory=dict)
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    draining: bool = False

    def add_model(self, name: str, engine) -> ModelWorker:
        sig = ModelSignature.from_engine(engine, name, self.config.max_batch_size,
                                         tuple(self.config.length_buckets))
        if sig.batch_symbol is None:
            log.warning("model %s has no symbolic batch dim: served one request at a time "
                        "(compile with dynamic_dims={i: {0: 'batch'}} to batch)", name)
        w = ModelWorker(engine, sig, self.config.batch_config(sig.batch_symbol is not None),
                        self.config.queue_limit, self.metrics, warmup=self.config.warmup)
        self.workers[name] = w
        return w

    def begin_drain(self) -> None:
        self.draining = True
        for w in self.workers.values():
            w.begin_drain()

    def ready(self) -> bool:
        return not self.draining and all(w.ready for w in self.workers.values())


def _error(status: int, message: str, headers: dict | None = None,
           request_id: str | None = None) -> JSONResponse:
    body = {"error": message} if request_id is None else {"error": message, "id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ProtocolError(400, f"bad Content-Length {length!r}")
        if int(length) > limit:
            raise ProtocolError(413, f"the body of {int(length)} bytes exceeds the limit of "
                                     f"{limit} bytes (--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"the body exceeds the limit of {limit} bytes "
                                     "(--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(state: ServingState) -> FastAPI:
    """The FastAPI application over ``state`` (its workers are started by the lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        for w in state.workers.values():
            w.start()
        yield
        state.begin_drain()
        await asyncio.get_running_loop().run_in_executor(None, _stop_all, state)

    app = FastAPI(title="deepseek serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    cfg = state.config

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request, e: ProtocolError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, e.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(e.status_code, f"{e.detail}: {request.method} {request.url.path} "
                                     "(KServe v2 routes are under /v2)")

    def guard(request: Request) -> None:
        if cfg.token is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 cfg.token.encode()):
            raise ProtocolError(401, "missing or wrong bearer token: send 'Authorization: "
                                     "Bearer <token>' (the token given to deepseek serve)")

    def worker(name: str, version: str | None = None) -> ModelWorker:
        w = state.workers.get(name)
        if w is None:
            raise ProtocolError(404, f"unknown model {name!r}; this server has "
                                     f"{sorted(state.workers)}")
        if version not in (None, "", "1"):
            raise ProtocolError(404, f"model {name!r} has only version '1', not {version!r}")
        return w

    @app.get("/v2")
    async def server_metadata(request: Request):
        guard(request)
        from deepseek import __version__

        return {"name": "deepseek", "version": __version__,
                "extensions": ["binary_tensor_data", "model_configuration"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        ok = state.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metadata(request: Request, name: str, version: str | None = None):
        guard(request)
        return model_metadata(worker(name, version).sig)

    async def model_ready(request: Request, name: str, version: str | None = None):
        guard(request)
        ok = worker(name, version).ready
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def config(request: Request, name: str, version: str | None = None):
        guard(request)
        w = worker(name, version)
        return model_config(w.sig, w.config)

    async def infer(request: Request, name: str, version: str | None = None):
        arrival = time.monotonic()
        try:
            guard(request)
        except ProtocolError:  # arbitrary names would make arbitrary label values
            state.metrics.answered(name if name in state.workers else "_unknown", "unauthorized")
            raise
        try:
            w = worker(name, version)
        except ProtocolError:
            state.metrics.answered("_unknown", "bad_request")
            raise
        try:
            body = await _read_body(request, cfg.max_request_bytes)
            body = decode_body(body, request.headers.get("content-encoding"),
                               cfg.max_request_bytes)
            hlen = request.headers.get("inference-header-content-length")
            if len(body) > _OFFLOAD_BYTES:  # keep the event loop responsive for big bodies
                req = await asyncio.to_thread(parse_infer_request, body, hlen, w.sig)
            else:
                req = parse_infer_request(body, hlen, w.sig)
        except ProtocolError:
            state.metrics.answered(name, "bad_request")
            raise
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(outcome: Outcome) -> None:  # called on the worker thread, exactly once
            loop.call_soon_threadsafe(done.set_result, outcome)

        try:
            w.submit(req.id or "", req.tensors, req.rows, req.env, on_done,
                     deadline_ms=req.deadline_ms, priority=req.priority, arrival=arrival)
        except Rejected as e:
            state.metrics.refusal(name, _REASON[e.outcome])
            state.metrics.answered(name, e.outcome)
            return _error(e.status, e.message, {"Retry-After": "1"} if e.status == 429 else None,
                          req.id)
        outcome: Outcome = await done
        state.metrics.answered(name, outcome.status)
        if outcome.status != "ok":
            return _error(_STATUS[outcome.status], outcome.message, request_id=req.id)
        total = time.monotonic() - arrival
        state.metrics.served(name, outcome.queue_s, outcome.compute_s, total, outcome.late)
        params = {"queue_ms": round(outcome.queue_s * 1e3, 3),
                  "compute_ms": round(outcome.compute_s * 1e3, 3),
                  "batch_size": outcome.batch_rows}
        if req.deadline_ms is not None:
            params["deadline_missed"] = outcome.late
        if sum(o.numel() * o.element_size() for o in outcome.outputs) > _OFFLOAD_BYTES:
            body, headers = await asyncio.to_thread(encode_infer_response, w.sig, req,
                                                    outcome.outputs, params)
        else:
            body, headers = encode_infer_response(w.sig, req, outcome.outputs, params)
        return Response(body, headers=headers)

    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{name}" + suffix
        app.add_api_route(base, metadata, methods=["GET"])
        app.add_api_route(base + "/ready", model_ready, methods=["GET"])
        app.add_api_route(base + "/config", config, methods=["GET"])
        app.add_api_route(base + "/infer", infer, methods=["POST"])

    @app.get("/metrics")
    async def metrics(request: Request):
        guard(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _stop_all(state: ServingState) -> None:
    for w in state.workers.values():
        w.stop(state.config.drain_timeout_s)


class _Uvicorn(uvicorn.Server):
    """uvicorn, plus: start draining the moment shutdown begins, and exit normally (status
    0) after a graceful shutdown on SIGTERM instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: ServingState):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()

    async def shutdown(self, sockets=None) -> None:
        self._state.begin_drain()
        await super().shutdown(sockets)


def make_server(state: ServingState, access_log: bool = False) -> _Uvicorn:
    cfg = state.config
    config = uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(cfg.drain_timeout_s) + 1,
                            timeout_keep_alive=5)
    return _Uvicorn(config, state)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free port, read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """A server running in a background thread of this process (tests, notebooks).

    Example::

        state = ServingState(ServeConfig(port=0))
        state.add_model("mnist", ds.load("mnist.dsk"))
        with ServerThread(state) as srv:
            print(srv.url)         # http://127.0.0.1:PORT
    """

    def __init__(self, state: ServingState, startup_timeout: float = 60.0):
        self.state = state
        self.sock = bind_socket(state.config.host, state.config.port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{state.config.host}:{self.port}"
        self.server = make_server(state)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="deepseek-http", daemon=True)
        self._startup_timeout = startup_timeout

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not (self.server.started and self.state.ready()):
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start within {self._startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown: drain, answer in-flight requests, join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(state: ServingState, access_log: bool = False,
                  announce: Callable[[str], None] | None = None) -> None:
    """Run in the foreground until SIGINT/SIGTERM, then drain and return."""
    sock = bind_socket(state.config.host, state.config.port)
    host, port = sock.getsockname()[:2]
    server = make_server(state, access_log)
    if announce:
        announce(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
