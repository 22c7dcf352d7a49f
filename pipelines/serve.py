"""`adaptive-m3 serve`: an OpenAI-compatible endpoint for `AdaptiveLMM` on Ray Serve.

Each replica holds one `AdaptiveLMM`. Requests are checked at the door (`pipelines.serve_api`),
then Ray Serve's `@serve.batch` collects those that arrive together; the batch is split by
(scale, budget, max_tokens) and each part is answered as `AdaptiveLMM.generate` answers a
batch (`check`, then `generate_checked`: encode the images once, route them, generate grouped by
the chosen scale), with bad samples set aside for their own 400. So a request's answer is
exactly what `generate` gives offline. Ray Serve runs the replicas (here or on a cluster given
by its address) and restarts one that dies; its proxy listens on loopback unless told otherwise.
"""

import asyncio
import json
import logging
import math
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from pipelines.adaptive import AdaptiveLMM
from pipelines.serve_api import (
    DEFAULT_MODEL_NAME,
    Answer,
    ApiError,
    ApiLimits,
    ChatRequest,
    body_too_large,
    check_body_size,
    completion_body,
    models_body,
    parse_chat_request,
    stream_events,
)

APP_NAME = "adaptive-m3"
log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Everything `adaptive-m3 serve` takes; also what each replica is built from."""

    model: str
    router: str | None = None
    budget: str | None = None
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    allow_local_files: str | None = None
    max_batch_size: int = 32
    batch_wait_ms: float = 0.0
    max_ongoing_requests: int = 256
    max_body_mb: float = 16.0
    max_tokens: int = 64
    default_max_tokens: int = 8
    model_name: str = DEFAULT_MODEL_NAME
    health_check_period_s: float = 10.0

    def limits(self, scales: tuple[int, ...]) -> ApiLimits:
        allowed = Path(self.allow_local_files).resolve() if self.allow_local_files else None
        return ApiLimits(
            scales=scales,
            model_name=self.model_name,
            default_budget=self.budget,
            allow_local_files=allowed,
            max_body_bytes=int(self.max_body_mb * (1 << 20)),
            max_tokens=self.max_tokens,
            default_max_tokens=self.default_max_tokens,
        )


api = FastAPI(title="adaptive-m3", docs_url=None, redoc_url=None)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def server_error(error: Exception) -> ApiError:
    return ApiError(
        f"the server failed to answer: {type(error).__name__}: {error}",
        status=500,
        kind="server_error",
    )


class BatchAnswerer:
    """Answers one batch of checked requests with `AdaptiveLMM.generate`, one call per
    (scale, budget, max_tokens) group; what a replica's batch handler runs."""

    def __init__(self, model: AdaptiveLMM) -> None:
        self.model = model

    def __call__(self, requests: list[ChatRequest]) -> list[Answer | ApiError]:
        """One `generate` per (scale, budget, max_tokens) group; a bad sample gets its own 400
        (`AdaptiveLMM.check` names it) and the rest of its group is answered."""
        out: list[Answer | ApiError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.group, []).append(i)
        for rows in groups.values():
            try:
                answers = self._generate([requests[i] for i in rows])
            except ValueError as error:  # the group's shared settings, e.g. an unusable budget
                answers = [ApiError(str(error), code="invalid_request")] * len(rows)
            except Exception as error:
                log.exception("generate failed")
                answers = [server_error(error)] * len(rows)
            for i, answer in zip(rows, answers, strict=True):
                if isinstance(answer, Answer):
                    answer.batch_size = len(requests)
                out[i] = answer
        return out  # type: ignore[return-value]

    def _generate(self, requests: list[ChatRequest]) -> list[Answer | ApiError]:
        first = requests[0]
        settings = {
            "scale": first.scale,
            "budget": first.budget,
            "max_new_tokens": first.max_tokens,
        }
        checked = self.model.check(
            [r.image for r in requests], [r.question for r in requests], **settings
        )
        out: list[Answer | ApiError | None] = [None] * len(requests)
        for error in checked.errors:  # SampleErrors named by their position in `requests`
            out[int(error.sample)] = ApiError(error.reason, code=error.kind)
        records = self.model.generate_checked(checked, batch_size=len(requests), **settings)
        eos = self.model.lmm.tokenizer.eos_token_id
        for row, ids, record in zip(checked.rows, checked.prompts.ids, records, strict=True):
            text_tokens = len(ids) - 1  # less the image slot
            out[row] = Answer(
                text=record.text,
                scale=record.scale,
                visual_tokens=record.visual_tokens,
                tried_scales=list(record.tried_scales),
                routed_by=record.routed_by,
                confidence=record.confidence,
                completion_tokens=len(record.token_ids),
                prompt_tokens=record.visual_tokens + text_tokens * len(record.tried_scales),
                finished=bool(record.token_ids) and record.token_ids[-1] == eos,
            )
        return out  # type: ignore[return-value]


@serve.deployment
@serve.ingress(api)
class AdaptiveServer:
    """One replica: the model, the door checks, and the cross-request batcher.

    Whatever it uses is defined above it: `serve.ingress` pickles the app, and with it this
    class's functions and the globals they name, when the class is decorated."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from m3core.shipped import resolve_model
        from pipelines.cli import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, math.floor(config.cpus_per_replica)))
        device = "cuda" if config.gpus_per_replica > 0 else "cpu"
        self.config = config
        self.model = AdaptiveLMM.from_pretrained(
            resolve_model(config.model), config.router, device=device
        )
        if config.budget is not None:
            self.model.resolve_budget(config.budget)  # a bad default fails at start, not later
        self.limits = config.limits(self.model.scales)
        self.answer = BatchAnswerer(self.model)
        self.started = int(time.time())
        self._answer.set_max_batch_size(config.max_batch_size)
        self._answer.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    # -- routes ---------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.limits.model_name,
            "scales": list(self.model.scales),
            "router": self.model.router is not None,
            "calibrated": self.model.calibration is not None,
            "replica": serve.get_replica_context().replica_id.unique_id,
            # this replica's recent traffic against the router's calibration data
            # (None without the router folder's drift.json, or before the first answer)
            "drift": None if self.model.last_drift is None else self.model.last_drift.to_dict(),
        }

    @api.get("/v1/models")
    async def models(self) -> dict:
        extra = {
            "scales": list(self.model.scales),
            "router": self.model.router is not None,
            "calibrated": self.model.calibration is not None,
            "default_budget": self.limits.default_budget,
        }
        return models_body(self.limits, self.started, extra)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            body = await self._read_body(request)
            chat = await asyncio.to_thread(parse_chat_request, body, self.limits)
            answer = await self._answer(chat)
            if isinstance(answer, ApiError):
                return error_response(answer)
        except ApiError as error:
            return error_response(error)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            events = stream_events(chat, answer, completion_id, created)
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return JSONResponse(completion_body(chat, answer, completion_id, created))

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes the size limit (not after reading it all)."""
        check_body_size(request.headers.get("content-length"), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise body_too_large(self.limits)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- batching -------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _answer(self, requests: list[ChatRequest]) -> list[Answer | ApiError]:
        # The model runs on this event loop, as in Ray Serve's batching examples: requests
        # that arrive while it computes queue up and form the next batch together, so batches
        # grow with load and no idle request waits. In a worker thread, Serve would close a
        # batch every `batch_wait_ms` while the model is busy (bench/serve.py measured 5-9
        # requests per batch instead of 13-22 at concurrency 32).
        return self.answer(requests)


# -- running --------------------------------------------------------------------------------
def build_app(config: ServeConfig):
    """The Ray Serve application: `replicas` copies of the model behind one HTTP route."""
    actor = {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica}
    return AdaptiveServer.options(
        num_replicas=config.replicas,
        ray_actor_options=actor,
        # Requests wait in the replica's batch queue, which costs nothing; past this limit they
        # wait in the proxy, whose router re-polls busy replicas (throughput fell 2-5x).
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        health_check_period_s=config.health_check_period_s,
    ).bind(config)


def start(config: ServeConfig) -> str:
    """Deploy the application (starting Ray here if no cluster is running or given) and return
    its base URL once every replica is ready."""
    from pipelines.shards import RayOptions, _init_ray

    cpus = math.ceil(config.replicas * config.cpus_per_replica)
    _init_ray(RayOptions(workers=cpus, address=config.ray_address))
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def stop(shutdown_ray: bool = True) -> None:
    """Delete the application; stop Serve too if no other application runs on it (a shared
    cluster keeps the others'); then disconnect from Ray, or stop the Ray started here."""
    import ray

    if ray.is_initialized():
        apps = set(serve.status().applications)
        if APP_NAME in apps:
            serve.delete(APP_NAME)
        if not apps - {APP_NAME}:
            serve.shutdown()
        if shutdown_ray:
            ray.shutdown()


def serve_forever(config: ServeConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    import ray

    owned_ray = not ray.is_initialized()
    stop_event = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: stop_event.set()) for s in signals}
    try:
        url = start(config)
        print(f"serving {config.model_name} at {url}/v1 ({json.dumps(asdict(config))})", flush=True)
        while not stop_event.wait(0.5):
            pass
        print("shutting down", flush=True)
    finally:
        stop(shutdown_ray=owned_ray)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
