"""The HTTP routes of `multiar serve` (FastAPI): /v1/generate, /v1/completions, /v1/models,
/v1/files/{id}, /health, /metrics; bearer-token checks, body limits, JSON errors for anything a client
sends (never a traceback). Routes hand requests to the engines' queues; none touches a model."""

from __future__ import annotations

import asyncio
import hmac
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from multiar.commands.serve_api import (
    Files,
    Flow,
    Outcomes,
    completion,
    completion_body,
    completion_stream,
    generate_result,
    generate_stream,
)
from multiar.commands.serve_engine import TTFT_BUCKETS, Closed, QueueFull
from multiar.commands.serve_page import add_page_routes
from multiar.commands.serve_requests import RequestError, Served, plan
from multiar.errors import ConfigError, first_line
from multiar.tags import Tagged


@dataclass
class AppState:
    """What the routes share: the models, the limits, the key, the files, the counters."""

    models: dict[str, Served]
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float | None = 600.0
    retry_after: int = 1
    ready: bool = False
    draining: bool = False
    load_error: BaseException | None = None  # why loading the models failed
    files: Files = field(default_factory=lambda: Files(1000))
    outcomes: Outcomes = field(default_factory=Outcomes)


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


class Guard:
    """The bearer token on /v1/ routes (401) and the declared body size (413), before any route. Plain
    ASGI: starlette's @app.middleware("http") relays every chunk of a streamed response through a memory
    stream and a task, a cost paid per token event."""

    def __init__(self, app: Any, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self.refusal(Headers(scope=scope), scope["path"])
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers, path: str) -> Response | None:
        key, limit = self.state.api_key, self.state.max_body_bytes
        if key is not None and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error(
                    401,
                    "a valid bearer token is required (Authorization: Bearer KEY)",
                    "authentication_error",
                )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413, f"the request body exceeds {limit} bytes", "invalid_request_error")
        return None


def create_app(state: AppState, cors_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="multiar serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    app.add_middleware(Guard, state=state)

    if cors_origins:  # added after the guard: outermost, so preflights and 401s and 413s get its headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def any_error(request: Request, err: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(err).__name__}", "server_error")

    add_routes(app, state)
    add_page_routes(app)  # GET /: the page (multiar/commands/static)
    return app


async def read_json(request: Request, state: AppState) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body_bytes:
            raise RequestError(f"the request body exceeds {state.max_body_bytes} bytes", 413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the body is not JSON", 400) from None
    except RecursionError:
        raise RequestError("the body's JSON is nested too deeply", 400) from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object", 400)
    return data


def served_model(state: AppState, body: dict[str, Any]) -> Served:
    name = body.get("model")
    if name is None and len(state.models) == 1:
        return next(iter(state.models.values()))
    if not isinstance(name, str) or name not in state.models:
        raise RequestError(
            f"model: {name!r} is not served; models: {', '.join(state.models)}", 404, "not_found_error"
        )
    return state.models[name]


async def start(state: AppState, request: Request, completions: bool) -> tuple[Flow, dict[str, Any], Served]:
    """Read, check and plan a request, and queue it: its flow, or RequestError (429, 503...)."""
    if state.draining or not state.ready:
        raise RequestError(
            "the server is not taking requests (starting or shutting down)", 503, "unavailable"
        )
    raw = await read_json(request, state)
    received = time.monotonic()
    served = served_model(state, raw)
    body = completion_body(raw, served) if completions else raw
    if completions and not served.text:
        raise RequestError(
            f"/v1/completions serves text domains; {served.name} is {served.run.domain.name}: use /v1/generate"
        )
    out_dir = served.files_dir / uuid.uuid4().hex
    try:
        return await queued(state, served, body, out_dir, received), raw, served
    except BaseException:  # refused: what it wrote (a prompt file, outputs opened) goes
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


async def queued(
    state: AppState, served: Served, body: dict[str, Any], out_dir: Path, received: float | None = None
) -> Flow:
    """Plan a request into out_dir and queue it: its flow, or RequestError (422, 429, 503)."""
    try:
        checked = await asyncio.to_thread(plan, served, body, out_dir, state.max_body_bytes)
    except (ConfigError, ValueError, TypeError, OSError) as err:
        raise RequestError(first_line(err)) from None
    flow = Flow(served, checked, state.request_timeout, received)
    try:
        flow.submit()
    except QueueFull as err:
        state.outcomes.counts["rejected_full"] += 1
        raise RequestError(str(err), 429, "rate_limit_error") from None
    except Closed as err:
        raise RequestError(str(err), 503, "unavailable") from None
    return flow


def add_routes(app: FastAPI, state: AppState) -> None:
    async def run(request: Request, completions: bool) -> Response:
        try:
            flow, raw, served = await start(state, request, completions)
        except RequestError as err:
            headers = {"Retry-After": str(state.retry_after)} if err.status == 429 else None
            return error(err.status, str(err), err.kind, headers)
        gone = request.is_disconnected
        if raw.get("stream"):
            stream = (
                completion_stream(flow, served.name, gone, state.outcomes)
                if completions
                else generate_stream(flow, gone, state.files, state.outcomes)
            )
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            result = await generate_result(flow, gone, state.files)
        except RequestError as err:
            state.outcomes.counts[err.kind] += 1
            return error(err.status, str(err), err.kind)
        state.outcomes.counts["ok"] += 1
        return JSONResponse(completion(flow, served.name, result["samples"]) if completions else result)

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        return await run(request, False)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": n,
                "object": "model",
                "owned_by": "multiar",
                "domain": s.run.domain.name,
                "tags": list(s.run.domain.tags) if isinstance(s.run.domain, Tagged) else [],
            }
            for n, s in list(state.models.items())
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/files/{key}")
    async def files(key: str) -> Response:
        path = state.files.get(key)
        if path is None or not path.is_file():
            return error(404, "no such file", "not_found_error")
        return FileResponse(path, filename=path.name)

    @app.get("/health")
    async def health() -> Response:
        ok = state.ready and not state.draining
        body = {
            "status": "ready" if ok else ("draining" if state.draining else "loading"),
            "models": list(state.models),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus(state))


def prometheus(state: AppState) -> str:
    """Prometheus text: requests by outcome, queue length, busy slots, tokens, the CPU time of per-token
    checks (grammars), TTFT histogram."""
    lines = ["# TYPE multiar_requests_total counter"]
    lines += [
        f'multiar_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(state.outcomes.counts.items())
    ]
    for kind, name, value in (
        ("gauge", "multiar_queue_length", lambda s: s.engine.waiting),
        ("gauge", "multiar_busy_slots", lambda s: s.engine.busy),
        ("gauge", "multiar_slots", lambda s: s.engine.slots),
        ("counter", "multiar_generated_tokens_total", lambda s: s.engine.stats.tokens),
        ("counter", "multiar_steps_total", lambda s: s.engine.stats.steps),
        ("counter", "multiar_step_rows_computed_total", lambda s: s.engine.stats.rows_computed),
        ("counter", "multiar_step_rows_decoding_total", lambda s: s.engine.stats.rows_decoding),
        ("counter", "multiar_check_cpu_seconds_total", lambda s: s.engine.stats.check_seconds),
        ("counter", "multiar_check_wall_seconds_total", lambda s: s.engine.stats.check_wall_seconds),
        ("counter", "multiar_gc_seconds_total", lambda s: s.engine.stats.gc_seconds),
    ):
        lines.append(f"# TYPE {name} {kind}")
        lines += [f'{name}{{model="{n}"}} {value(s)}' for n, s in list(state.models.items())]
    lines.append("# TYPE multiar_ttft_seconds histogram")
    for n, s in list(state.models.items()):
        stats, total = s.engine.stats, 0
        for le, c in zip([*map(str, TTFT_BUCKETS), "+Inf"], stats.ttft_counts, strict=True):
            total += c
            lines.append(f'multiar_ttft_seconds_bucket{{model="{n}",le="{le}"}} {total}')
        lines.append(f'multiar_ttft_seconds_sum{{model="{n}"}} {stats.ttft_sum}')
        lines.append(f'multiar_ttft_seconds_count{{model="{n}"}} {total}')
    return "\n".join(lines) + "\n"
