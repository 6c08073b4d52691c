"""The JSON-RPC 2.0 method handlers of ``rkat-rpc`` (transport-free: lines in, messages out).

Invariants:
- Every request gets exactly one response (unless the client is gone); a handler never
  brings the server down: runtime exceptions become ``SurfaceError``s (``common.classify``),
  anything unexpected an ``internal`` error with the exception named (and logged).
- Requests run concurrently, one task each; ``tools/register`` runs inline so that a turn
  sent after it sees the tools.
- Parameters are checked before anything changes: a request that fails validation has no
  effect (``-32602`` with ``data.field``).
- A request that runs a turn (``session/create``, ``turn/start``) answers only after every
  agent event of the session published so far is written as ``session/event``.
- Callback tools (``tools/register``) live in ``Runtime.tools``, offered to every session's
  agent; a call sends ``tool/execute`` to the client and waits for its answer, or until the
  run is cancelled, or the client goes away (then the call reports an error and the run goes
  on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..core.tools import ToolContext, ToolFailed, schema_tool
from ..errors import InputNotFoundError, MeerkatRuntimeError, SessionNotFoundError
from ..host import Runtime
from ..llm.registry import UnknownModelError, infer_provider
from ..runtime.driver import SessionRuntime
from ..runtime.inputs import SystemGeneratedInput
from ..runtime.outcomes import Deduplicated, Rejected
from ..runtime.state import RuntimeState
from ..sessions import SessionView
from ..store.base import StoreError
from ._rpc_events import EventHub
from ._rpc_protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    MessageWriter,
    Oversized,
    RpcError,
    error_object,
    guess_id,
)
from .common import (
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
from .config import ConfigDocument

__all__ = ["CONTRACT_VERSION", "RpcServer"]

log = logging.getLogger("meerkat_runtime.rpc")

CONTRACT_VERSION = "0.4.10"
"""The Meerkat RPC contract this server speaks (the SDK checks the minor version)."""

SERVER_NAME = "meerkat-rpc"

INJECT_APPLY_WAIT = 2.0
"""Seconds ``session/inject_context`` waits for an idle session to apply the context."""

_MIN_WAIT = 0.05
"""Seconds ``input/wait`` waits at least, so ``timeout: 0`` answers for a terminal input."""

_UNAVAILABLE_FAMILIES = {
    "mob/": ("mob", "mobs"),
    "skills/": ("skills", "skills"),
    "mcp/": ("mcp_live", "MCP servers"),
    "models/": ("models", "a model catalog"),
}

_CAPABILITIES: tuple[tuple[str, str, str | None], ...] = (
    ("sessions", "Create, read, list, archive sessions; run turns", None),
    ("streaming", "session/event notifications and session/stream_open subscriptions", None),
    ("structured_output", "output_schema on create and per turn", None),
    ("session_store", "Durable sessions (SQLite) with recovery after restart", None),
    ("callback_tools", "Client tools registered with tools/register", None),
    ("runtime_control", "runtime/* and input/* methods", None),
    ("hooks", "Hooks", "hooks"),
    ("builtins", "Built-in tools", "builtins"),
    ("shell", "Shell tool", "shell"),
    ("comms", "Peer comms between named sessions of the store (comms/send, comms/peers)", None),
    ("memory_store", "Semantic memory", "memory"),
    ("session_compaction", "Context compaction", "compaction"),
    ("skills", "Skills", "skills"),
    ("mcp_live", "Live MCP servers", "mcp"),
    ("mob", "Mobs (multi-agent groups)", "mob"),
)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(slots=True)
class AfterResponse:
    """A result plus work to start once the response is on the wire."""

    result: Any
    then: Callable[[], None]


class _ClientGone(Exception):
    pass


# ------------------------------------------------------------------ parameter helpers


def _bad(field: str, problem: str) -> SurfaceError:
    return SurfaceError("bad_request", f"{field}: {problem}", field=field)


def _text(params: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise _bad(key, f"expected a string, got {got}")
    if not allow_empty and not value.strip():
        raise _bad(key, "must not be empty")
    return value


def _opt_text(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(key, f"expected a string, got {type(value).__name__}")
    return value


def _opt_int(params: dict[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"expected an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise _bad(key, f"expected an integer >= {minimum}, got {value}")
    return value


def _opt_number(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _bad(key, "expected a number of seconds >= 0")
    return float(value)


def _opt_bool(params: dict[str, Any], key: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(key, f"expected true or false, got {type(value).__name__}")
    return value


def _input_id(params: dict[str, Any]) -> str:
    from .._ids import InputId

    raw = _text(params, "input_id")
    try:
        return str(InputId(raw))
    except (TypeError, ValueError):
        raise _bad("input_id", f"{raw!r} is not an input id (a UUID)") from None


def _response(rid: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, exc: SurfaceError | RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": error_object(exc)}


# ------------------------------------------------------------------ the server


class RpcServer:
    """One client connection: the handlers, the in-flight requests, the callback tools."""

    def __init__(
        self,
        rt: Runtime,
        writer: MessageWriter,
        config: ConfigDocument,
        *,
        default_offline_script: list[dict[str, Any]] | None = None,
        max_line: int = 8 << 20,
    ) -> None:
        self.rt = rt
        self.writer = writer
        self.config = config
        self.default_offline_script = default_offline_script
        self.max_line = max_line
        self.events = EventHub(rt, writer.send)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._client_request_seq = 0
        self._callback_tools: set[str] = set()
        self._client_gone = False
        self._methods: dict[str, Handler] = {
            "initialize": self.initialize,
            "initialized": self.initialized,
            "capabilities/get": self.capabilities_get,
            "session/create": self.session_create,
            "session/list": self.session_list,
            "session/read": self.session_read,
            "session/history": self.session_history,
            "session/archive": self.session_archive,
            "session/inject_context": self.session_inject_context,
            "session/stream_open": self.session_stream_open,
            "session/stream_close": self.session_stream_close,
            "turn/start": self.turn_start,
            "turn/interrupt": self.turn_interrupt,
            "runtime/state": self.runtime_state,
            "runtime/accept": self.runtime_accept,
            "runtime/retire": self.runtime_retire,
            "runtime/respawn": self.runtime_respawn,
            "runtime/reset": self.runtime_reset,
            "runtime/destroy": self.runtime_destroy,
            "runtime/cancel": self.runtime_cancel,
            "runtime/recover": self.runtime_recover,
            "input/state": self.input_state,
            "input/list": self.input_list,
            "input/wait": self.input_wait,
            "input/cancel": self.input_cancel,
            "comms/send": self.comms_send,
            "comms/peers": self.comms_peers,
            "config/get": self.config_get,
            "config/set": self.config_set,
            "config/patch": self.config_patch,
            "tools/register": self.tools_register,
        }

    @property
    def methods(self) -> list[str]:
        return list(self._methods)

    # -------------------------------------------------------------- framing

    async def handle_line(self, line: bytes | Oversized) -> None:
        """Handle one line of input: a request (answered, usually from its own task), a
        response to a request this server sent, or a notification (ignored)."""
        if isinstance(line, Oversized):
            self._reply(
                _error(
                    guess_id(line.prefix),
                    RpcError(
                        INVALID_REQUEST,
                        "too_large",
                        f"request too large: the line has more than {self.max_line} bytes "
                        f"(at least {line.size}); the limit is set by --max-line-bytes / "
                        "MEERKAT_RPC_MAX_LINE_BYTES",
                        limit=self.max_line,
                    ),
                )
            )
            return
        if not line.strip():
            return
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self._reply(_error(None, RpcError(PARSE_ERROR, "parse_error", f"parse error: {exc}")))
            return
        if isinstance(msg, list):
            self._reply(
                _error(
                    None,
                    RpcError(
                        INVALID_REQUEST,
                        "invalid_request",
                        "invalid request: batches are not supported; send one request object "
                        "per line",
                    ),
                )
            )
            return
        if not isinstance(msg, dict):
            self._reply(
                _error(
                    None,
                    RpcError(
                        INVALID_REQUEST,
                        "invalid_request",
                        f"invalid request: expected a JSON object, got {type(msg).__name__}",
                    ),
                )
            )
            return
        rid = msg.get("id")
        valid_id = rid is None or (isinstance(rid, str | int | float) and not isinstance(rid, bool))
        if "method" not in msg and "id" in msg and ("result" in msg or "error" in msg):
            self._on_client_response(msg)
            return
        problem = self._request_problem(msg, valid_id)
        if problem is not None:
            if "id" not in msg and isinstance(msg.get("method"), str):
                return  # a malformed notification: nothing to answer
            self._reply(
                _error(
                    rid if valid_id else None, RpcError(INVALID_REQUEST, "invalid_request", problem)
                )
            )
            return
        method: str = msg["method"]
        if "id" not in msg:
            log.debug("notification %s ignored", method)
            return
        params = msg.get("params")
        if method == "tools/register":
            # inline, so that a request sent after it sees the tools
            reply, after = await self._execute(rid, method, params)
            self._reply(reply, after)
            return
        self._track(self._run(rid, method, params), f"rpc:{method}:{rid}")

    def _track(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, reply: dict[str, Any], after: Callable[[], None] | None = None) -> None:
        """Send from a task of its own: the input loop never waits for the client to read
        (tasks start in order and the writer's lock is fair, so replies keep their order)."""

        async def send() -> None:
            await self.writer.send(reply)
            if after is not None:
                after()

        self._track(send(), "rpc:reply")

    @staticmethod
    def _request_problem(msg: dict[str, Any], valid_id: bool) -> str | None:
        if msg.get("jsonrpc") != "2.0":
            return 'invalid request: "jsonrpc" must be "2.0"'
        if "method" not in msg:
            return 'invalid request: "method" is missing'
        if not isinstance(msg["method"], str):
            return f'invalid request: "method" must be a string, got {type(msg["method"]).__name__}'
        if not valid_id:
            return 'invalid request: "id" must be a string, a number or null'
        return None

    async def _run(self, rid: Any, method: str, params: Any) -> None:
        reply, after = await self._execute(rid, method, params)
        await self.writer.send(reply)
        if after is not None:
            after()

    async def _execute(
        self, rid: Any, method: str, params: Any
    ) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """The response message of a request and what to start once it is sent."""
        after: Callable[[], None] | None = None
        try:
            result = await self._dispatch(method, params)
            if isinstance(result, AfterResponse):
                after = result.then
                result = result.result
            reply = _response(rid, result)
        except (SurfaceError, RpcError) as exc:
            reply = _error(rid, exc)
        except asyncio.CancelledError:
            raise
        except (MeerkatRuntimeError, StoreError, TimeoutError) as exc:
            reply = _error(rid, classify(exc))
        except Exception as exc:
            log.exception("method %s failed", method)
            reply = _error(rid, classify(exc))
        return reply, after

    async def _dispatch(self, method: str, params: Any) -> Any:
        handler = self._methods.get(method)
        if handler is None:
            raise self._unknown(method)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RpcError(
                INVALID_PARAMS,
                "bad_request",
                f"invalid params: {method} takes its parameters by name (a JSON object), got "
                f"{type(params).__name__}",
            )
        return await handler(params)

    @staticmethod
    def _unknown(method: str) -> RpcError:
        for prefix, (capability, what) in _UNAVAILABLE_FAMILIES.items():
            if method.startswith(prefix):
                return RpcError(
                    METHOD_NOT_FOUND,
                    "method_not_found",
                    f"method not found: {method} (this runtime has no {what}; capability "
                    f"{capability!r} is unavailable)",
                    method=method,
                    capability=capability,
                )
        return RpcError(
            METHOD_NOT_FOUND,
            "method_not_found",
            f"method not found: {method}; see the methods listed by initialize",
            method=method,
        )

    # -------------------------------------------------------------- shutdown

    def client_gone(self) -> None:
        """The client closed its input: pending callback requests fail at once."""
        self._client_gone = True
        for fut in self._client_requests.values():
            if not fut.done():
                fut.set_exception(_ClientGone())

    async def drain(self, timeout: float, stop: asyncio.Event | None = None) -> None:
        """Wait up to ``timeout`` seconds for in-flight requests to finish (less if ``stop``
        is set meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stopper = asyncio.ensure_future((stop or asyncio.Event()).wait())
        try:
            while self._tasks and not stopper.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                await asyncio.wait(
                    {*self._tasks, stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            stopper.cancel()

    async def close(self) -> None:
        """Cancel what is still in flight, stop event delivery, drop callback tools."""
        self.client_gone()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.events.close(notify=not self.writer.broken and not self._client_gone)
        for name in self._callback_tools:
            self.rt.tools.unregister(name)
        self._callback_tools.clear()

    # -------------------------------------------------------------- session helpers

    async def _session(self, params: dict[str, Any], *, allow_archived: bool = False) -> str:
        sid = _text(params, "session_id")
        try:
            info = await self.rt.get_session(sid)
        except SessionNotFoundError:
            raise SurfaceError("not_found", f"no session {sid!r}", session_id=sid) from None
        if info.archived and not allow_archived:
            raise SurfaceError(
                "not_found", f"session {sid} is archived", session_id=sid, archived=True
            )
        return sid

    async def _loaded(self, sid: str) -> SessionRuntime:
        """The session's runtime, loaded (and recovered) in this process."""
        srt = await self.rt.load(sid)
        if srt is None:
            raise SurfaceError("conflict", self.rt.not_owned_message(sid), session_id=sid)
        return srt

    # -------------------------------------------------------------- handshake

    async def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "server_info": {
                "name": SERVER_NAME,
                "version": __version__,
                "implementation": "meerkat-runtime (Python)",
            },
            "contract_version": CONTRACT_VERSION,
            "methods": self.methods,
        }

    async def initialized(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def capabilities_get(self, params: dict[str, Any]) -> dict[str, Any]:
        caps = []
        for cap_id, description, missing in _CAPABILITIES:
            status: Any = "Available" if missing is None else {"NotCompiled": {"feature": missing}}
            caps.append({"id": cap_id, "description": description, "status": status})
        return {"contract_version": CONTRACT_VERSION, "capabilities": caps}

    # -------------------------------------------------------------- sessions

    def _take_script(self, params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """``params`` with ``provider_params.offline_script`` taken out (returned apart)."""
        params = dict(params)
        script: Any = None
        pp = params.get("provider_params")
        if isinstance(pp, dict) and "offline_script" in pp:
            pp = dict(pp)
            script = pp.pop("offline_script")
            params["provider_params"] = pp or None
            if script is None:
                script = False  # explicitly no script (not even the default one)
        return params, script

    async def session_create(self, params: dict[str, Any]) -> Any:
        params, script = self._take_script(params)
        cfg = self.config
        req = parse_create(params, default_model=str(cfg.get("model") or "offline"))
        if params.get("model") is None and params.get("provider") is None:
            req.provider = cfg.get("provider")
        if req.system_prompt is None:
            req.system_prompt = cfg.get("system_prompt")
        for key in ("max_tokens", "max_turns", "structured_output_retries"):
            if key not in req.settings and cfg.get(key) is not None:
                req.settings[key] = cfg.get(key)
        default_pp = cfg.get("provider_params")
        if default_pp:
            req.settings["provider_params"] = {
                **default_pp,
                **req.settings.get("provider_params", {}),
            }
        try:
            offline = infer_provider(req.model, req.provider) == "offline"
        except UnknownModelError:
            offline = False  # creating the session reports the problem
        if script is not None and script is not False and not offline:
            raise _bad(
                "provider_params.offline_script",
                "applies only to sessions of the offline model (model 'offline')",
            )
        if script is None:
            script = cfg.get("offline_script") or self.default_offline_script
        if offline and script:
            if not isinstance(script, list):
                raise _bad("provider_params.offline_script", "expected an array of steps")
            req.settings["offline_script"] = script
        sid = await create_session(self.rt, req)
        await self.events.ensure_forwarder(sid)
        if req.deferred:
            return {"session_id": sid}
        assert req.prompt is not None
        try:
            handle = await start_turn(
                self.rt, TurnRequest(sid, req.prompt, req.metadata, req.idempotency_key)
            )
            return await wait_turn(self.rt, sid, handle)
        except SurfaceError as exc:
            exc.details.setdefault("session_id", sid)
            raise
        finally:
            await self.events.flush(sid)

    async def session_list(self, params: dict[str, Any]) -> dict[str, Any]:
        labels = params.get("labels")
        if labels is not None and not (
            isinstance(labels, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise _bad("labels", "expected an object of string keys to string values")
        offset = _opt_int(params, "offset") or 0
        limit = _opt_int(params, "limit")
        include_archived = bool(_opt_bool(params, "include_archived"))
        await self.rt.start()
        records = await self.rt.store.list_sessions(include_archived=include_archived)
        if labels:
            records = [r for r in records if all(r.labels.get(k) == v for k, v in labels.items())]
        records = records[offset:]
        if limit is not None:
            records = records[:limit]
        out = []
        for rec in records:
            messages = [r.message for r in await self.rt.store.load_conversation(rec.session_id)]
            active, state = False, None
            try:
                srt = self.rt.runtime(rec.session_id)
                active, state = srt.active_run_id is not None, srt.state.value
                if len(srt.conversation) > len(messages):
                    messages = srt.conversation.messages()
            except SessionNotFoundError:
                pass
            last = next((m.created_at for m in reversed(messages) if m.created_at), None)
            view = SessionView.build(rec, messages, is_active=active, state=state, updated_at=last)
            summary = wire_session_summary(view)
            if rec.archived:
                summary["archived"] = True
            out.append(summary)
        return {"sessions": out}

    async def session_read(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params, allow_archived=True)
        return wire_session_info(await self.rt.read_session(sid))

    async def session_history(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params, allow_archived=True)
        offset = _opt_int(params, "offset") or 0
        limit = _opt_int(params, "limit")
        return wire_history(await self.rt.history(sid, offset=offset, limit=limit))

    async def session_archive(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params, allow_archived=True)
        counts = await self.rt.archive_session(sid)
        await self.events.end_session(sid)
        return {"session_id": sid, "archived": True, **counts}

    async def session_inject_context(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params)
        text = _text(params, "text")
        source = _opt_text(params, "source")
        key = _opt_text(params, "idempotency_key")
        srt = await self.rt.load(sid)  # None: a worker runs it; the input goes to its inbox
        idle = srt is None or (srt.state is RuntimeState.IDLE and srt.active_run_id is None)
        await self.events.ensure_forwarder(sid)
        header: dict[str, Any] = {}
        if key:
            header["idempotency_key"] = key
        item = SystemGeneratedInput.new(source or "rpc", text, **header)
        handle = await self.rt.accept_with_completion(sid, item)
        outcome = handle.outcome
        if isinstance(outcome, Rejected):
            raise reject_error(outcome.code.value, outcome.reason)
        if isinstance(outcome, Deduplicated):
            return {
                "session_id": sid,
                "status": "duplicate",
                "input_id": str(outcome.existing_id),
            }
        out: dict[str, Any] = {"session_id": sid, "input_id": str(outcome.input_id)}
        if not idle:
            return {**out, "status": "staged"}
        try:
            waited = await handle.wait(INJECT_APPLY_WAIT)
        except TimeoutError:
            return {**out, "status": "staged"}
        turn_result(sid, waited)  # raises for an input that did not apply
        await self.events.flush(sid)
        return {**out, "status": "applied"}

    async def session_stream_open(self, params: dict[str, Any]) -> AfterResponse:
        sid = await self._session(params)
        after = _opt_int(params, "after_seq")
        if after is None:
            after = await self.rt.last_event_seq(sid)
        stream = self.events.open_stream(sid, after)
        return AfterResponse(
            {
                "stream_id": stream.stream_id,
                "session_id": sid,
                "opened": True,
                "after_seq": after,
            },
            lambda: self.events.start_stream(stream),
        )

    async def session_stream_close(self, params: dict[str, Any]) -> dict[str, Any]:
        stream_id = _text(params, "stream_id")
        if self.events.stream_known(stream_id) is None:
            raise _bad("stream_id", f"no stream {stream_id!r} was opened on this connection")
        return await self.events.close_stream(stream_id)

    # -------------------------------------------------------------- turns

    async def turn_start(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params)
        req = parse_turn(params)
        await self.events.ensure_forwarder(sid)
        try:
            handle = await start_turn(self.rt, req)
            return await wait_turn(self.rt, sid, handle)
        finally:
            await self.events.flush(sid)

    async def turn_interrupt(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params)
        was_running = await self.rt.interrupt(sid)
        return {"session_id": sid, "interrupted": True, "was_running": was_running}

    # -------------------------------------------------------------- runtime control

    async def _runtime(self, params: dict[str, Any]) -> tuple[str, SessionRuntime]:
        sid = await self._session(params)
        srt = await self._loaded(sid)
        await self.events.ensure_forwarder(sid)
        return sid, srt

    async def runtime_state(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, srt = await self._runtime(params)
        out: dict[str, Any] = {"session_id": sid, "state": srt.state.value}
        if srt.active_run_id is not None:
            out["active_run_id"] = str(srt.active_run_id)
        return out

    async def runtime_accept(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params)  # owned elsewhere: accepted into its inbox (S10)
        await self.events.ensure_forwarder(sid)
        raw = params.get("input")
        if not isinstance(raw, dict):
            got = "nothing" if raw is None else type(raw).__name__
            raise _bad("input", f"expected an Input object, got {got}")
        outcome = await self.rt.accept(sid, raw)
        return outcome.to_json_dict()

    async def runtime_retire(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, srt = await self._runtime(params)
        planned = bool(_opt_bool(params, "replacement_planned"))
        counts = await self.rt.retire(sid, replacement_planned=planned)
        return {"session_id": sid, **counts, "state": srt.state.value}

    async def runtime_respawn(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, _ = await self._runtime(params)
        counts = await self.rt.respawn(sid)
        return {"session_id": sid, **counts, "state": self.rt.runtime_state(sid).value}

    async def runtime_reset(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, srt = await self._runtime(params)
        counts = await self.rt.reset(sid)
        return {"session_id": sid, **counts, "state": srt.state.value}

    async def runtime_destroy(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, srt = await self._runtime(params)
        counts = await self.rt.destroy(sid)
        return {"session_id": sid, **counts, "state": srt.state.value}

    async def runtime_cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, _ = await self._runtime(params)
        reason = _opt_text(params, "reason") or "cancelled by the client"
        return {"session_id": sid, "cancelled": await self.rt.cancel(sid, reason)}

    async def runtime_recover(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, srt = await self._runtime(params)
        report = self.rt.recovery_reports.get(sid) or {}
        return {"session_id": sid, "state": srt.state.value, "report": dict(report)}

    # -------------------------------------------------------------- inputs

    async def input_state(self, params: dict[str, Any]) -> dict[str, Any] | None:
        sid = await self._session(params, allow_archived=True)
        iid = _input_id(params)
        try:
            state = await self.rt.get_input_state(sid, iid)
        except InputNotFoundError:
            return None
        return state.to_json_dict()

    async def input_list(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, _ = await self._runtime(params)
        include_terminal = bool(_opt_bool(params, "include_terminal"))
        states = self.rt.list_inputs(sid, include_terminal=include_terminal)
        return {"session_id": sid, "input_ids": [str(s.input_id) for s in states]}

    async def input_wait(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params, allow_archived=True)
        iid = _input_id(params)
        timeout = _opt_number(params, "timeout")
        if timeout is not None:
            # a zero timeout still lets a terminal input answer (from memory or the store)
            timeout = max(timeout, _MIN_WAIT)
        try:
            outcome = await self.rt.wait(sid, iid, timeout)
        except TimeoutError:
            return {"session_id": sid, "input_id": iid, "timed_out": True, "outcome": None}
        except InputNotFoundError:
            raise SurfaceError(
                "not_found", f"no input {iid} in session {sid}", session_id=sid, input_id=iid
            ) from None
        return {
            "session_id": sid,
            "input_id": iid,
            "timed_out": False,
            "outcome": outcome.to_json_dict(),
        }

    async def input_cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        sid, _ = await self._runtime(params)
        iid = _input_id(params)
        try:
            state = await self.rt.cancel_input(sid, iid)
        except InputNotFoundError:
            raise SurfaceError(
                "not_found", f"no input {iid} in session {sid}", session_id=sid, input_id=iid
            ) from None
        return state.to_json_dict()

    # -------------------------------------------------------------- peer comms

    async def comms_send(self, params: dict[str, Any]) -> dict[str, Any]:
        req = parse_comms_send(params)
        return await comms_send(self.rt, req)

    async def comms_peers(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = await self._session(params, allow_archived=True)
        return {"peers": await comms_peers(self.rt, sid, meta=False)}

    # -------------------------------------------------------------- config

    async def config_get(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.config.envelope()

    async def config_set(self, params: dict[str, Any]) -> dict[str, Any]:
        expected = _opt_int(params, "expected_generation")
        if "config" in params:
            doc = params["config"]
        else:  # the document itself, unwrapped
            doc = {k: v for k, v in params.items() if k != "expected_generation"}
        return self.config.set(doc, expected)

    async def config_patch(self, params: dict[str, Any]) -> dict[str, Any]:
        expected = _opt_int(params, "expected_generation")
        if "patch" in params:
            patch = params["patch"]
        else:
            patch = {k: v for k, v in params.items() if k != "expected_generation"}
        return self.config.patch(patch, expected)

    # -------------------------------------------------------------- callback tools

    async def tools_register(self, params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("tools")
        if not isinstance(raw, list):
            raise _bad("tools", "expected an array of {name, description?, input_schema?}")
        built = []
        for index, item in enumerate(raw):
            where = f"tools[{index}]"
            if not isinstance(item, dict):
                raise _bad(where, f"expected an object, got {type(item).__name__}")
            name = item.get("name")
            if not isinstance(name, str):
                raise _bad(f"{where}.name", "expected a string")
            description = item.get("description") or ""
            if not isinstance(description, str):
                raise _bad(f"{where}.description", "expected a string")
            schema = item.get("input_schema")
            if schema is None:
                schema = {"type": "object"}
            timeout = _opt_number(item, "timeout")
            existing = self.rt.tools.get(name)
            if existing is not None and name not in self._callback_tools:
                raise _bad(f"{where}.name", f"a server tool named {name!r} already exists")
            try:
                built.append(
                    schema_tool(
                        name,
                        schema,
                        self._callback(name),
                        description=description,
                        timeout=timeout,
                    )
                )
            except (TypeError, ValueError) as exc:
                raise _bad(where, str(exc)) from None
        if len({t.name for t in built}) != len(built):
            raise _bad("tools", "tool names must be unique")
        for tool in built:
            self.rt.tools.unregister(tool.name)
            try:
                self.rt.tools.register(tool)
            except ValueError as exc:  # a reserved name such as 'wait'
                raise _bad("tools", str(exc)) from None
            self._callback_tools.add(tool.name)
        return {"registered": [t.name for t in built], "tools": sorted(self._callback_tools)}

    def _callback(self, name: str) -> Callable[[dict[str, Any], ToolContext], Awaitable[str]]:
        async def run(arguments: dict[str, Any], context: ToolContext) -> str:
            reply = await self._ask_client(
                "tool/execute",
                {
                    "name": name,
                    "arguments": arguments,
                    "session_id": context.session_id,
                    "call_id": context.call_id,
                },
                what=f"tool {name!r}",
            )
            error = reply.get("error")
            if error is not None:
                message = error.get("message") if isinstance(error, dict) else error
                raise ToolFailed(f"error: the client could not run tool {name!r}: {message}")
            result = reply.get("result")
            if not isinstance(result, dict):
                result = {"content": result}
            content = result.get("content", "")
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False)
            if result.get("is_error"):
                raise ToolFailed(content)
            return content

        return run

    async def _ask_client(
        self, method: str, params: dict[str, Any], *, what: str
    ) -> dict[str, Any]:
        """Send a request to the client and wait for its response message."""
        gone = ToolFailed(f"error: {what} is served by the client, which has disconnected")
        if self._client_gone or self.writer.broken:
            raise gone
        self._client_request_seq += 1
        rid = f"srv-{self._client_request_seq}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._client_requests[rid] = fut
        try:
            await self.writer.send(
                {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
            )
            if self.writer.broken:
                raise gone
            return await fut
        except _ClientGone:
            raise gone from None
        finally:
            self._client_requests.pop(rid, None)

    def _on_client_response(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        fut = self._client_requests.get(rid) if isinstance(rid, str) else None
        if fut is None:
            log.debug("response to unknown or abandoned request %r ignored", rid)
            return
        if not fut.done():
            fut.set_result(msg)
