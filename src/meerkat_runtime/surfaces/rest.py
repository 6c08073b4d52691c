"""The REST surface: Meerkat 0.4.10's HTTP API over a ``Runtime`` (FastAPI + uvicorn).

Entry points: ``create_app`` (the ASGI app; tests pass their own ``Runtime``) and ``serve``
(blocking; ``meerkat serve``). The endpoints, the error table and the event stream are
described in ``docs/rest.md``.

Invariants:
- Every error answer is ``{"error": message, "code": code, ...details}`` with a code from
  ``common.ERROR_CODES``, and its HTTP status comes from ``STATUS_BY_CODE`` alone. Runtime
  errors are classified by ``common.classify``: a wrong-state operation is 409, an unknown
  session or input 404 (the reference answered 404 for everything).
- Bad input changes nothing: bodies over ``MAX_BODY_BYTES`` are refused (413) before they are
  read, malformed JSON and wrong types are 400 naming the field, and both happen before any
  runtime call. FastAPI's 422 is never sent.
- Request parsing and the wire shapes are ``common``'s, shared with JSON-RPC and the CLI: a
  turn's per-turn overrides reach the run as turn metadata; nothing is silently dropped.
- With a token, every endpoint but ``/health`` and the webhooks needs ``Authorization:
  Bearer <token>``. ``serve`` refuses to listen beyond loopback without one. Webhooks
  (``POST /webhooks/{session_id}/{event_type}``, ``_rest_webhooks``) are authenticated by
  their HMAC signature instead, and are disabled (403) for a session without a secret.
- Shutdown never hangs (S19): event streams and long polls end at once; the app's own
  Runtime is closed (its runs get their grace period, in-flight turn waits then answer);
  any wait still open is answered 503 ``not_ready`` with the input id to wait on later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .._ids import InputId
from ..errors import MeerkatRuntimeError, SessionNotFoundError
from ..host import Runtime
from ..runtime.driver import SessionRuntime
from ..runtime.input_state import InputLifecycleState
from ..runtime.inputs import SystemGeneratedInput
from ..runtime.outcomes import (
    CompletedWait,
    CompletedWithoutResultWait,
    Deduplicated,
    RejectCode,
    Rejected,
)
from ..sessions import SessionView
from ..store.base import StoreError
from ._rest_guard import Guard
from ._rest_models import (
    REQUEST_MODELS,
    AcceptOutcomeBody,
    ArchivedBody,
    CancelledBody,
    CommsReceiptBody,
    CreatedSession,
    ErrorBody,
    HealthBody,
    HistoryBody,
    InputListBody,
    InputStateBody,
    InterruptedBody,
    PeersBody,
    RecoverBody,
    RunResultBody,
    RuntimeReportBody,
    RuntimeStateBody,
    SessionInfoBody,
    SessionListBody,
    SystemContextBody,
    TurnAcceptedBody,
    WaitOutcomeBody,
    WaitPendingBody,
    WebhookAcceptedBody,
)
from ._rest_sse import event_stream
from ._rest_webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    WEBHOOK_PATH,
    WEBHOOK_SECRET_ENV,
    SecretSource,
    WebhookSecrets,
    accept_delivery,
)
from ._rest_webhooks import signature as webhook_signature
from .common import (
    ERROR_CODES,
    SurfaceError,
    TurnRequest,
    classify,
    comms_peers,
    comms_send,
    create_session,
    parse_comms_send,
    parse_create,
    parse_turn,
    reject_error,
    start_turn,
    turn_result,
    wait_turn,
    wire_history,
    wire_session_info,
    wire_session_summary,
)

__all__ = [
    "KEEPALIVE_SECONDS",
    "MAX_BODY_BYTES",
    "MAX_WAIT_SECONDS",
    "STATUS_BY_CODE",
    "WEBHOOK_SECRET_ENV",
    "SecretSource",
    "ServeConfigError",
    "create_app",
    "serve",
    "webhook_signature",
]

log = logging.getLogger("meerkat_runtime.rest")

T = TypeVar("T")

MAX_BODY_BYTES = 1 << 20
"""Request bodies larger than this (1 MiB) are answered 413 before they are read."""
KEEPALIVE_SECONDS = 15.0
"""An SSE comment goes out after this many seconds without an event."""
MAX_WAIT_SECONDS = 300.0
"""The longest ``GET /input/{session_id}/{input_id}/wait`` long poll."""
SYSTEM_CONTEXT_WAIT = 5.0
"""How long ``POST /sessions/{id}/system_context`` waits for an idle session to apply it."""

STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "unsupported": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "cancelled": 409,
    "too_large": 413,
    "budget_exhausted": 422,
    "queue_full": 429,
    "failed": 500,
    "internal": 500,
    "provider_error": 502,
    "not_ready": 503,
    "timeout": 504,
}
"""The one table from error codes to HTTP statuses (documented in docs/rest.md)."""

assert set(STATUS_BY_CODE) == set(ERROR_CODES), "every error code needs an HTTP status"


class ServeConfigError(ValueError):
    """``serve`` was asked for something unsafe or impossible (nothing was bound)."""


# ------------------------------------------------------------------ app state


@dataclass(slots=True)
class _AppState:
    runtime: Runtime | None
    owns_runtime: bool
    webhooks: WebhookSecrets = field(default_factory=WebhookSecrets)
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # streams, long polls end
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # turn waits end

    def rt(self) -> Runtime:
        if self.runtime is None:
            raise SurfaceError("not_ready", "the server is starting or stopping; try again")
        return self.runtime


async def _begin_shutdown(state: _AppState) -> None:
    """End streams and long polls, close our Runtime (S19: its runs get their grace, turn
    waits are answered), then cut whatever still waits."""
    state.draining.set()
    if state.owns_runtime and state.runtime is not None:
        try:
            await state.runtime.close()
        except Exception as exc:
            log.error("closing the runtime failed: %s", exc)
    state.stopping.set()


class _Interrupted(Exception):
    """The server began shutting down while a request waited."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _until(event: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T:
    """``await coro``, unless ``event`` is set first (then ``_Interrupted``; ``coro`` is
    cancelled, which never cancels the input it waits for)."""
    if event.is_set():
        coro.close()
        raise _Interrupted
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise _Interrupted


# ------------------------------------------------------------------ errors


def _error_response(err: SurfaceError, status: int | None = None) -> JSONResponse:
    code = status or STATUS_BY_CODE.get(err.code, 500)
    headers = {"Retry-After": "1"} if code in (429, 503) else None
    return JSONResponse(err.to_json_dict(), status_code=code, headers=headers)


def _bad(field_name: str, problem: str) -> SurfaceError:
    return SurfaceError("bad_request", f"{field_name}: {problem}", field=field_name)


def _install_error_handlers(app: FastAPI) -> None:
    async def surface_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SurfaceError)
        return _error_response(exc)

    async def runtime_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(classify(exc))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:]) or where
        msg = str(first.get("msg", "invalid value"))
        return _error_response(
            SurfaceError("bad_request", f"{name} ({where}): {msg}", field=name, location=where)
        )

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = SurfaceError("not_found", "no such endpoint; see /openapi.json")
        elif exc.status_code == 405:
            err = SurfaceError("bad_request", "method not allowed on this endpoint")
        else:
            err = SurfaceError("bad_request", str(exc.detail))
        response = _error_response(err, exc.status_code)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return _error_response(classify(exc))

    app.add_exception_handler(SurfaceError, surface_error)
    app.add_exception_handler(MeerkatRuntimeError, runtime_error)
    app.add_exception_handler(StoreError, runtime_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# ------------------------------------------------------------------ request helpers


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise SurfaceError(
            "bad_request", "body: the request body is empty; expected a JSON object", field="body"
        )
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise SurfaceError("bad_request", f"body: not valid JSON ({exc})", field="body") from None
    if not isinstance(value, dict):
        raise SurfaceError(
            "bad_request",
            f"body: expected a JSON object, got {type(value).__name__}",
            field="body",
        )
    return value


def _input_id(value: str) -> InputId:
    try:
        return InputId(value)
    except ValueError as exc:
        raise _bad("input_id", str(exc)) from None


def _labels(raw: list[str] | None) -> dict[str, str] | None:
    if not raw:
        return None
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _bad("label", f"expected key=value, got {item!r}")
        out[key] = value
    return out


def _optional_text(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, bool):
        raise _bad(key, f"expected a string, got {type(value).__name__}")
    return value


def _live(rt: Runtime, session_id: str) -> SessionRuntime | None:
    try:
        return rt.runtime(session_id)
    except SessionNotFoundError:
        return None


async def _loaded(rt: Runtime, session_id: str) -> SessionRuntime:
    """The session's runtime in this process, loading (and recovering) it on first use."""
    await rt.get_session(session_id)
    live = await rt.load(session_id)
    if live is None:
        raise SurfaceError("conflict", rt.not_owned_message(session_id), session_id=session_id)
    return live


async def _summary_view(rt: Runtime, session_id: str) -> SessionView:
    """A session's view for a listing, without loading (leasing) sessions this process
    does not run yet."""
    live = _live(rt, session_id)
    if live is not None and live.failure is None:
        return await rt.read_session(session_id)
    record = await rt.store.load_session(session_id)
    if record is None:
        raise SessionNotFoundError(session_id)
    messages = [r.message for r in await rt.store.load_conversation(session_id)]
    last = next((m.created_at for m in reversed(messages) if m.created_at), None)
    return SessionView.build(record, messages, is_active=False, state=None, updated_at=last)


# ------------------------------------------------------------------ OpenAPI helpers


_ERROR_TEXT = {
    400: "bad request (code bad_request or unsupported): the message names the field",
    401: "missing or wrong bearer token (only when the server has a token); for a webhook, "
    "a missing or wrong X-Meerkat-Signature",
    403: "webhooks are not enabled for this session (no secret configured)",
    404: "unknown session or input",
    409: "wrong state, idempotency conflict, cancelled turn, or owned by another process",
    413: "request body over 1 MiB, or input over the runtime's max_input_bytes",
    422: "the turn exhausted a budget (code budget_exhausted)",
    429: "the session's queue is full",
    500: "the turn failed (code failed) or an internal error",
    502: "the model provider failed",
    503: "the runtime is not ready (starting, stopping, recovering); retry",
    504: "timed out",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        s: {"model": ErrorBody, "description": _ERROR_TEXT[s]}
        for s in sorted({400, 401, 413, 503, *statuses})
    }


_TURN_ERRORS = (404, 409, 422, 429, 500, 502, 503)


def _body(model: str, description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def _custom_openapi(app: FastAPI, token: str | None) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, defs = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas.update(defs.get("$defs", {}))
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            responses = op.get("responses", {}) if isinstance(op, dict) else {}
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]  # FastAPI's validation answer: ours is a 400
            for status, response in responses.items():
                content = response.get("content", {})
                if not status.startswith("2") and "text/event-stream" in content:
                    # errors of the event stream are JSON like every other error
                    response["content"] = {"application/json": content.pop("text/event-stream")}
    for name in ("HTTPValidationError", "ValidationError"):
        if name in schemas and name not in json.dumps(schema["paths"]):
            del schemas[name]
    if token:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "MEERKAT_API_TOKEN"}
        }
        schema["security"] = [{"bearer": []}]
        paths = schema.get("paths", {})
        for path, method in (("/health", "get"), (_WEBHOOK_ROUTE, "post")):
            op = paths.get(path, {}).get(method)
            if isinstance(op, dict):
                op["security"] = []  # no bearer token (webhooks: their signature)
    app.openapi_schema = schema
    return schema


_SSE_EVENT_SCHEMA: dict[str, Any] = {
    "description": "one Server-Sent Event (OpenAPI 3.1: the schema describes each event)",
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "the envelope's seq (events_gap: its `to`)"},
        "event": {"type": "string", "description": "the event code, e.g. run.completed"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "the event envelope {id, seq, timestamp, runtime_id, event}",
        },
    },
    "required": ["id", "event", "data"],
}


class _EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


_WEBHOOK_ROUTE = "/webhooks/{session_id}/{event_type}"


# ------------------------------------------------------------------ the app


def create_app(
    runtime: Runtime | None = None,
    *,
    store: str | None = None,
    token: str | None = None,
    webhook_secret: str | None = None,
    webhook_secrets: SecretSource | None = None,
    owns_sessions: bool = True,
) -> FastAPI:
    """The REST app. With ``runtime`` the app uses it (and leaves closing it to the caller);
    otherwise it opens ``Runtime.open(store, owns_sessions=owns_sessions)`` at startup and
    closes it at shutdown (S19). ``owns_sessions=False``: the app's Runtime never takes a
    session's lease, so every accepted input goes to the session's durable inbox and a worker
    process runs it; waits and long polls follow the input through the store, and operations
    that need the session's owner (runtime state and control, interrupt, input listing,
    cancel and ack) answer 409 ``conflict``.
    ``owns_sessions`` is ignored when ``runtime`` is given (the caller chose its Runtime).
    With ``token``, every endpoint but ``/health`` and the webhooks needs ``Authorization:
    Bearer <token>``. Webhooks (docs/webhooks.md) check their signature with the session's
    secret from ``webhook_secrets`` (a mapping from session id, or a function of it that
    answers ``None`` for none), else ``webhook_secret``; a session with neither has webhooks
    disabled. The environment is not read here (``serve`` reads it)."""
    token = token or None
    state = _AppState(
        runtime=runtime,
        owns_runtime=runtime is None,
        webhooks=WebhookSecrets(webhook_secrets, webhook_secret or None),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.owns_runtime:
            rt = Runtime.open(store, owns_sessions=owns_sessions)
            await rt.start()
            state.runtime = rt
        else:
            assert state.runtime is not None
            await state.runtime.start()
        try:
            yield
        finally:
            state.draining.set()
            state.stopping.set()
            if state.owns_runtime and state.runtime is not None:
                await state.runtime.close()

    app = FastAPI(
        title="Meerkat runtime REST API",
        version=__version__,
        description=(
            "Sessions, turns, the runtime's inputs and events over HTTP (Meerkat 0.4.10's "
            "REST surface). Errors are `{error, code, ...details}`; see docs/rest.md."
        ),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.meerkat = state
    _install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(
        Guard, token=token, max_body=MAX_BODY_BYTES, open_routes=[("POST", WEBHOOK_PATH)]
    )

    def openapi() -> dict[str, Any]:
        return _custom_openapi(app, token)

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_routes(app: FastAPI, state: _AppState) -> None:
    async def wait_for_turn(session_id: str, req: TurnRequest) -> dict[str, Any]:
        rt = state.rt()
        handle = await start_turn(rt, req)
        try:
            return await _until(state.stopping, wait_turn(rt, session_id, handle))
        except _Interrupted:
            raise SurfaceError(
                "not_ready",
                f"the server is shutting down; the turn lives on: wait for input "
                f"{handle.input_id} after the restart",
                input_id=str(handle.input_id),
            ) from None

    # -------------------------------------------------------------- health

    @app.get("/health", response_model=HealthBody, summary="Liveness (no auth)", tags=["meta"])
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    # -------------------------------------------------------------- sessions

    @app.post(
        "/sessions",
        response_model=CreatedSession,
        summary="Create a session and run its first turn",
        description=(
            "Creates the session, then (unless `initial_turn` is `deferred`) runs `prompt` as "
            "its first turn and answers its WireRunResult. A deferred session answers "
            "`{session_id}`; its prompt is prepended to the first turn's. When the first turn "
            "fails, the error carries the `session_id` of the session that was created."
        ),
        responses=_errors(*_TURN_ERRORS),
        openapi_extra=_body("CreateSessionRequest", "the session and its first prompt"),
        tags=["sessions"],
    )
    async def create(request: Request) -> JSONResponse:
        params = await _json_object(request)
        req = parse_create(params)
        sid = await create_session(state.rt(), req)
        if req.deferred or req.prompt is None:
            return JSONResponse({"session_id": sid})
        turn = TurnRequest(sid, req.prompt, req.metadata, req.idempotency_key)
        try:
            return JSONResponse(await wait_for_turn(sid, turn))
        except SurfaceError as err:
            err.details.setdefault("session_id", sid)
            raise

    @app.get(
        "/sessions",
        response_model=SessionListBody,
        summary="List sessions",
        description="In creation order; `label=k=v` (repeatable) keeps sessions carrying all.",
        responses=_errors(),
        tags=["sessions"],
    )
    async def list_sessions(
        limit: int | None = Query(None, ge=0, description="at most this many"),
        offset: int = Query(0, ge=0, description="skip this many"),
        label: list[str] | None = Query(None, description="key=value; repeatable (AND)"),
        include_archived: bool = Query(False, description="list archived sessions too"),
    ) -> JSONResponse:
        labels = _labels(label)
        rt = state.rt()
        infos = await rt.list_sessions(
            include_archived=include_archived, labels=labels, offset=offset, limit=limit
        )
        views = [await _summary_view(rt, info.id) for info in infos]
        return JSONResponse({"sessions": [wire_session_summary(v) for v in views]})

    @app.get(
        "/sessions/{session_id}",
        response_model=SessionInfoBody,
        summary="Read a session",
        responses=_errors(404),
        tags=["sessions"],
    )
    async def read_session(session_id: str) -> JSONResponse:
        return JSONResponse(wire_session_info(await state.rt().read_session(session_id)))

    @app.get(
        "/sessions/{session_id}/history",
        response_model=HistoryBody,
        summary="A page of the session's conversation",
        responses=_errors(404),
        tags=["sessions"],
    )
    async def history(
        session_id: str,
        offset: int = Query(0, ge=0),
        limit: int | None = Query(None, ge=0),
    ) -> JSONResponse:
        page = await state.rt().history(session_id, offset=offset, limit=limit)
        return JSONResponse(wire_history(page))

    @app.post(
        "/sessions/{session_id}/messages",
        response_model=RunResultBody,
        summary="Run a turn",
        description=(
            "Accepts the prompt and waits for its run: the WireRunResult. Per-turn overrides "
            "(`model`, `provider`, `max_tokens`, `system_prompt`, `output_schema`, "
            "`structured_output_retries`, `provider_params`, `additional_instructions`) apply "
            "to this run only. A repeat with the same `idempotency_key` and content answers "
            "the original input's result with `existing_id`; different content is 409. With "
            "`wait=false` the answer is 202 `{input_id, outcome}` at once."
        ),
        responses={
            202: {"model": TurnAcceptedBody, "description": "accepted (wait=false)"},
            **_errors(*_TURN_ERRORS),
        },
        openapi_extra=_body("TurnRequestBody", "the prompt and per-turn overrides"),
        tags=["sessions"],
    )
    async def turn(
        session_id: str,
        request: Request,
        wait: bool = Query(True, description="false: answer 202 once accepted"),
    ) -> JSONResponse:
        params = await _json_object(request)
        req = parse_turn(params, session_id=session_id)
        if not wait:
            handle = await start_turn(state.rt(), req)
            return JSONResponse(
                {"input_id": str(handle.input_id), "outcome": handle.outcome.to_json_dict()},
                status_code=202,
            )
        return JSONResponse(await wait_for_turn(session_id, req))

    @app.post(
        "/sessions/{session_id}/interrupt",
        response_model=InterruptedBody,
        summary="Interrupt the running turn",
        description="`interrupted` is false when no turn was running.",
        responses=_errors(404, 409),
        tags=["sessions"],
    )
    async def interrupt(session_id: str) -> JSONResponse:
        done = await state.rt().interrupt(session_id)
        return JSONResponse({"session_id": session_id, "interrupted": done})

    @app.delete(
        "/sessions/{session_id}",
        response_model=ArchivedBody,
        summary="Archive a session",
        description="Its pending inputs end `abandoned{retired}`; its history stays readable.",
        responses=_errors(404, 409),
        tags=["sessions"],
    )
    async def archive(session_id: str) -> JSONResponse:
        await state.rt().archive_session(session_id)
        return JSONResponse({"session_id": session_id, "archived": True})

    @app.post(
        "/sessions/{session_id}/system_context",
        response_model=SystemContextBody,
        summary="Append system context",
        description=(
            "Accepts a `system_generated` input: an idle session applies it at once "
            "(`applied`, no model call); a busy one at its next boundary (`staged`); a repeat "
            "of an idempotency key answers `duplicate`."
        ),
        responses=_errors(404, 409, 429, 503),
        openapi_extra=_body("SystemContextRequest", "the context text"),
        tags=["sessions"],
    )
    async def system_context(session_id: str, request: Request) -> JSONResponse:
        params = await _json_object(request)
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            got = "nothing" if text is None else type(text).__name__
            raise _bad("text", f"expected a non-empty string, got {got}")
        source = _optional_text(params, "source")
        key = _optional_text(params, "idempotency_key")
        rt = state.rt()
        info = await rt.get_session(session_id)
        if info.archived:
            raise SurfaceError("conflict", f"session {session_id} is archived; it takes no input")
        inp = SystemGeneratedInput.new(source or "rest", text, idempotency_key=key)
        handle = await rt.accept_with_completion(session_id, inp)
        outcome = handle.outcome
        if isinstance(outcome, Rejected):
            raise reject_error(outcome.code.value, outcome.reason)
        iid = str(handle.input_id)
        if isinstance(outcome, Deduplicated):
            return JSONResponse({"session_id": session_id, "status": "duplicate", "input_id": iid})
        live = _live(rt, session_id)
        busy = (
            live is not None
            and live.active_run_id is not None
            and outcome.state.current_state
            in (InputLifecycleState.ACCEPTED, InputLifecycleState.QUEUED)
        )
        status = "staged"
        if not busy:
            try:
                done = await _until(state.stopping, handle.wait(SYSTEM_CONTEXT_WAIT))
            except (TimeoutError, _Interrupted):
                done = None
            if isinstance(done, CompletedWait | CompletedWithoutResultWait):
                status = "applied"
            elif done is not None:
                turn_result(session_id, done)  # raises the error that says how it ended
        return JSONResponse({"session_id": session_id, "status": status, "input_id": iid})

    @app.get(
        "/sessions/{session_id}/events",
        response_class=_EventStreamResponse,
        summary="The session's events (Server-Sent Events)",
        description=(
            "Runtime and agent events in the session's one sequence: `id: <seq>`, "
            "`event: <code>` (e.g. `input.accepted`, `agent.text_delta`, `run.completed`), "
            "`data: <envelope JSON>`. Resume with `Last-Event-ID` (or `after`); a resume "
            "past what is kept starts with `stream.events_gap`. `follow=false` sends what is "
            "kept, then ends. A `: keep-alive` comment goes out every 15 s."
        ),
        responses={
            200: {
                "description": "text/event-stream",
                "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}},
            },
            **_errors(404),
        },
        tags=["events"],
    )
    async def events(
        session_id: str,
        after: int | None = Query(None, ge=0, description="send events with seq > after"),
        follow: bool = Query(True, description="false: send what is kept, then end"),
        last_event_id: str | None = Header(None, description="resume after this seq"),
    ) -> StreamingResponse:
        start = after or 0
        if last_event_id is not None and last_event_id.strip():
            try:
                start = int(last_event_id.strip())
            except ValueError:
                start = -1
            if start < 0:
                raise _bad(
                    "Last-Event-ID", f"expected a non-negative integer, got {last_event_id!r}"
                )
        rt = state.rt()
        await rt.get_session(session_id)
        return _EventStreamResponse(
            event_stream(
                rt,
                session_id,
                start,
                follow=follow,
                stop=state.draining,
                keepalive=KEEPALIVE_SECONDS,
            ),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -------------------------------------------------------------- runtime

    @app.get(
        "/runtime/{session_id}/state",
        response_model=RuntimeStateBody,
        summary="The session runtime's state",
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def runtime_state(session_id: str) -> JSONResponse:
        live = await _loaded(state.rt(), session_id)
        return JSONResponse({"session_id": session_id, "state": live.state.value})

    @app.post(
        "/runtime/{session_id}/accept",
        response_model=AcceptOutcomeBody,
        summary="Accept an Input",
        description=(
            "The body is an `Input` JSON document. Answers its AcceptOutcome JSON: 200 for "
            "`accepted`, `deduplicated` and most `rejected` (its `code` says why); "
            "`rejected{too_large}` is 413 and `rejected{queue_full}` 429, with the outcome "
            "plus `error` and `code`."
        ),
        responses={
            **_errors(404, 429),
            413: {"model": AcceptOutcomeBody, "description": "too large (body or input)"},
            429: {"model": AcceptOutcomeBody, "description": "the session's queue is full"},
        },
        openapi_extra=_body("InputRequest", "an Input JSON document"),
        tags=["runtime"],
    )
    async def accept(session_id: str, request: Request) -> JSONResponse:
        await _json_object(request)  # malformed JSON is a 400, not a rejected outcome
        raw = await request.body()
        outcome = await state.rt().accept(session_id, raw)
        body = outcome.to_json_dict()
        if isinstance(outcome, Rejected) and outcome.code in (
            RejectCode.TOO_LARGE,
            RejectCode.QUEUE_FULL,
        ):
            err = reject_error(outcome.code.value, outcome.reason)
            body.update({"error": err.message, "code": err.code})
            status = STATUS_BY_CODE[err.code]
            headers = {"Retry-After": "1"} if status == 429 else None
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse(body)

    @app.post(
        "/runtime/{session_id}/retire",
        response_model=RuntimeReportBody,
        summary="Retire the runtime",
        description=(
            "Stops admitting input. Without a planned replacement the queued inputs end "
            "`abandoned{retired}`; with one they are kept for `respawn`."
        ),
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def retire(session_id: str, replacement_planned: bool = Query(False)) -> JSONResponse:
        report = await state.rt().retire(session_id, replacement_planned=replacement_planned)
        return JSONResponse({"session_id": session_id, **report})

    @app.post(
        "/runtime/{session_id}/respawn",
        response_model=RuntimeReportBody,
        summary="Respawn the runtime (keeps durable pending input)",
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def respawn(session_id: str) -> JSONResponse:
        report = await state.rt().respawn(session_id)
        return JSONResponse({"session_id": session_id, **report})

    @app.post(
        "/runtime/{session_id}/reset",
        response_model=RuntimeReportBody,
        summary="Reset the runtime (abandons pending input, clears the conversation)",
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def reset(session_id: str) -> JSONResponse:
        report = await state.rt().reset(session_id)
        return JSONResponse({"session_id": session_id, **report})

    @app.post(
        "/runtime/{session_id}/destroy",
        response_model=RuntimeReportBody,
        summary="Destroy the runtime (terminal)",
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def destroy(session_id: str) -> JSONResponse:
        report = await state.rt().destroy(session_id)
        return JSONResponse({"session_id": session_id, **report})

    @app.post(
        "/runtime/{session_id}/cancel",
        response_model=CancelledBody,
        summary="Cancel the active run",
        description="`cancelled` is false when no run was active.",
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def cancel(session_id: str) -> JSONResponse:
        done = await state.rt().cancel(session_id, "cancelled via REST")
        return JSONResponse({"session_id": session_id, "cancelled": done})

    @app.post(
        "/runtime/{session_id}/recover",
        response_model=RecoverBody,
        summary="Load (and recover) the session in this process",
        description=(
            "Takes the session's lease and recovers it from the store if this process does "
            "not run it yet (or its instance stopped); answers the recovery report of this "
            "process's load. 409 while another live process owns the session."
        ),
        responses=_errors(404, 409),
        tags=["runtime"],
    )
    async def recover(session_id: str) -> JSONResponse:
        rt = state.rt()
        live = await _loaded(rt, session_id)
        return JSONResponse(
            {
                "session_id": session_id,
                "state": live.state.value,
                "recovery_report": rt.recovery_reports.get(session_id),
            }
        )

    # -------------------------------------------------------------- peer comms

    @app.post(
        "/comms/send",
        response_model=CommsReceiptBody,
        summary="Send a peer message, request or response",
        description=(
            "From `session_id` (a session with a comms name) to a peer of the store, as a "
            "durable `peer` input accepted into the peer's inbox (docs/comms.md). Answers the "
            "receipt. `envelope_id` makes retries safe: the same envelope id answers the same "
            "receipt and delivers nothing new. Bad input (unknown or archived peer, a missing "
            "or misplaced field, a response to a request that is not outstanding, an archived "
            "or unnamed sender) is 400 naming the field; an unknown sender 404; a target that "
            "refused the input keeps its reject code: 413 `too_large`, 429 `queue_full`, 503 "
            "`not_ready` (retired), 409 `conflict` (envelope id reused for other content). "
            "Nothing is delivered on any error."
        ),
        responses=_errors(404, 409, 429),
        openapi_extra=_body("CommsSendRequest", "the send"),
        tags=["comms"],
    )
    async def send_to_peer(request: Request) -> JSONResponse:
        req = parse_comms_send(await _json_object(request))
        return JSONResponse(await comms_send(state.rt(), req))

    @app.get(
        "/comms/peers",
        response_model=PeersBody,
        summary="The session's peers",
        description=(
            "The other named, non-archived sessions of the store, oldest first: "
            "`{name, peer_id (session id), address, source, sendable_kinds, capabilities, "
            "meta}`."
        ),
        responses=_errors(404),
        tags=["comms"],
    )
    async def list_peers(
        session_id: str = Query(..., min_length=1, description="the session asking"),
    ) -> JSONResponse:
        return JSONResponse({"peers": await comms_peers(state.rt(), session_id)})

    # -------------------------------------------------------------- webhooks

    @app.post(
        _WEBHOOK_ROUTE,
        response_model=WebhookAcceptedBody,
        status_code=202,
        summary="Deliver an external event (webhook)",
        description=(
            "The body (JSON, or text with a non-JSON Content-Type) becomes the payload of a "
            "durable `external_event` input of type `event_type` (source `webhook`). "
            f"Authenticated by `{SIGNATURE_HEADER}: sha256=<hex HMAC-SHA256 of the raw body>` "
            "with the session's webhook secret, never by the bearer token; a session without "
            f"a secret answers 403. `{DELIVERY_HEADER}` is the idempotency key: a redelivery "
            "answers 200 `deduplicated` with the first input's id, the same id with another "
            "body 409. The runtime's policy row for the event type decides the rest "
            "(supersede: the latest delivery of the type wins; coalesce: merged at the next "
            "run). See docs/webhooks.md."
        ),
        responses={
            200: {"model": WebhookAcceptedBody, "description": "a redelivery (deduplicated)"},
            **_errors(403, 404, 409, 429),
        },
        openapi_extra={
            "requestBody": {
                "required": False,
                "description": "the event's payload: any JSON value (or text)",
                "content": {"application/json": {"schema": {}}, "text/plain": {"schema": {}}},
            }
        },
        tags=["webhooks"],
    )
    async def webhook(
        session_id: str,
        event_type: str,
        request: Request,
        x_meerkat_signature: str | None = Header(
            None, alias=SIGNATURE_HEADER, description="sha256=<hex HMAC-SHA256 of the body>"
        ),
        x_meerkat_delivery: str | None = Header(
            None, alias=DELIVERY_HEADER, description="the delivery id (idempotency key)"
        ),
    ) -> JSONResponse:
        status, body = await accept_delivery(
            state.rt(),
            state.webhooks,
            session_id,
            event_type,
            await request.body(),
            signature_header=x_meerkat_signature,
            delivery=x_meerkat_delivery,
            content_type=request.headers.get("content-type"),
        )
        return JSONResponse(body, status_code=status)

    # -------------------------------------------------------------- inputs

    async def list_inputs_impl(
        session_id: str, include_terminal: bool, detail: bool
    ) -> JSONResponse:
        rt = state.rt()
        await _loaded(rt, session_id)
        states = rt.list_inputs(session_id, include_terminal=include_terminal)
        body: dict[str, Any] = {"input_ids": [str(s.input_id) for s in states]}
        if detail:
            body["inputs"] = [s.to_json_dict() for s in states]
        return JSONResponse(body)

    @app.get(
        "/input/{session_id}",
        response_model=InputListBody,
        summary="List the session's inputs",
        description="Non-terminal inputs (all with `include_terminal`); states with `detail`.",
        responses=_errors(404, 409),
        tags=["inputs"],
    )
    async def list_inputs(
        session_id: str,
        include_terminal: bool = Query(False),
        detail: bool = Query(False, description="add the full InputState documents"),
    ) -> JSONResponse:
        return await list_inputs_impl(session_id, include_terminal, detail)

    @app.get(
        "/input/{session_id}/list",
        response_model=InputListBody,
        summary="List the session's inputs (0.4.10 path)",
        responses=_errors(404, 409),
        tags=["inputs"],
        include_in_schema=False,
    )
    async def list_inputs_legacy(
        session_id: str,
        include_terminal: bool = Query(False),
        detail: bool = Query(False),
    ) -> JSONResponse:
        return await list_inputs_impl(session_id, include_terminal, detail)

    @app.get(
        "/input/{session_id}/{input_id}",
        response_model=InputStateBody,
        summary="An input's state",
        responses=_errors(404),
        tags=["inputs"],
    )
    async def input_state(session_id: str, input_id: str) -> JSONResponse:
        iid = _input_id(input_id)
        rt = state.rt()
        await rt.get_session(session_id)
        return JSONResponse((await rt.get_input_state(session_id, iid)).to_json_dict())

    @app.post(
        "/input/{session_id}/{input_id}/cancel",
        response_model=InputStateBody,
        summary="Cancel a pending input",
        responses=_errors(404, 409),
        tags=["inputs"],
    )
    async def cancel_input(session_id: str, input_id: str) -> JSONResponse:
        iid = _input_id(input_id)
        rt = state.rt()
        await rt.get_session(session_id)
        return JSONResponse((await rt.cancel_input(session_id, iid)).to_json_dict())

    @app.post(
        "/input/{session_id}/{input_id}/ack",
        response_model=InputStateBody,
        summary="Acknowledge an input",
        responses=_errors(404, 409),
        tags=["inputs"],
    )
    async def ack_input(session_id: str, input_id: str) -> JSONResponse:
        iid = _input_id(input_id)
        rt = state.rt()
        await rt.get_session(session_id)
        return JSONResponse((await rt.ack(session_id, iid)).to_json_dict())

    @app.get(
        "/input/{session_id}/{input_id}/wait",
        response_model=WaitOutcomeBody,
        summary="Wait for an input's outcome (long poll)",
        description=(
            "Answers the WaitOutcome JSON (S12) once the input is terminal, or 202 "
            "`{input_id, state, done: false}` when `timeout` seconds pass first (or the server "
            "is stopping): poll again."
        ),
        responses={
            202: {"model": WaitPendingBody, "description": "not finished yet"},
            **_errors(404, 409),
        },
        tags=["inputs"],
    )
    async def wait_input(
        session_id: str,
        input_id: str,
        timeout: float = Query(30.0, ge=0, le=MAX_WAIT_SECONDS, description="seconds"),
    ) -> JSONResponse:
        iid = _input_id(input_id)
        rt = state.rt()
        await rt.get_session(session_id)
        current = await rt.get_input_state(session_id, iid)  # unknown input: 404 at once
        # a terminal input answers at once, also with timeout=0 (its outcome may still need a
        # store read, or the end of the run that consumed it)
        budget = max(timeout, 1.0) if current.is_terminal else timeout
        try:
            outcome = await _until(state.draining, rt.wait(session_id, iid, budget))
        except (TimeoutError, _Interrupted):
            st = await rt.get_input_state(session_id, iid)
            return JSONResponse(
                {"input_id": str(iid), "state": st.current_state.value, "done": False},
                status_code=202,
            )
        return JSONResponse(outcome.to_json_dict())


# ------------------------------------------------------------------ serving


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app it stops before uvicorn waits for connections to
    close (long-lived streams would otherwise hold the shutdown until its timeout)."""

    def __init__(self, config: uvicorn.Config, state: _AppState) -> None:
        super().__init__(config)
        self.meerkat = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting while the app winds down
        await _begin_shutdown(self.meerkat)
        await super().shutdown(sockets)


def _server_for(app: FastAPI, **config: Any) -> _Server:
    state = app.state.meerkat
    assert isinstance(state, _AppState)
    config.setdefault("lifespan", "on")
    config.setdefault("timeout_graceful_shutdown", 30)
    return _Server(uvicorn.Config(app, **config), state)


def _is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    store: str | None = None,
    token: str | None = None,
    webhook_secret: str | None = None,
    webhook_secrets: SecretSource | None = None,
    owns_sessions: bool = True,
) -> None:
    """Serve the REST API until SIGINT/SIGTERM (blocking). ``token`` defaults to
    ``$MEERKAT_API_TOKEN``; a host beyond loopback needs one (``ServeConfigError``).
    ``webhook_secret`` (the secret of every session's webhooks) defaults to
    ``$MEERKAT_WEBHOOK_SECRET``; ``webhook_secrets`` gives sessions their own (see
    ``create_app``). ``owns_sessions=False``: the server runs no session (see
    ``create_app``); workers sharing its store run them."""
    if token is None:
        token = os.environ.get("MEERKAT_API_TOKEN")
    token = token or None
    if webhook_secret is None:
        webhook_secret = os.environ.get(WEBHOOK_SECRET_ENV)
    if token is None and not _is_loopback(host):
        raise ServeConfigError(
            f"refusing to serve on {host} without a token: set MEERKAT_API_TOKEN (clients "
            "then send 'Authorization: Bearer <token>') or bind to 127.0.0.1"
        )
    if not 0 <= port <= 65535:
        raise ServeConfigError(f"port must be between 0 and 65535, got {port}")
    app = create_app(
        store=store,
        token=token,
        webhook_secret=webhook_secret,
        webhook_secrets=webhook_secrets,
        owns_sessions=owns_sessions,
    )
    # the per-request access log is opt-in (MEERKAT_ACCESS_LOG=1): it is ~7 % of a request
    access_log = os.environ.get("MEERKAT_ACCESS_LOG", "") not in ("", "0", "false", "no")
    server = _server_for(app, host=host, port=port, access_log=access_log)
    server.run()
    if not server.started:
        raise RuntimeError(f"the REST server did not start on {host}:{port} (see the log)")
