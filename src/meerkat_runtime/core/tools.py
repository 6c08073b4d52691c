"""Application tools for the built-in agent: Python functions the model can call.

An application turns a function (sync or async) into a ``Tool`` with ``tool`` (or registers it
on a ``ToolRegistry``); the model sees the tool's JSON Schema, built from the function's type
hints with pydantic, and its description, taken from the docstring. The agent runs the calls
of one model turn concurrently, each through ``ToolRegistry.execute``. A tool implemented
elsewhere (a client process, a service) is built from a raw JSON Schema and an async handler
with ``schema_tool``; its arguments are validated against that schema.

Invariants:
- Registration fails loudly (``TypeError`` / ``ValueError`` saying what is wrong) for a
  parameter without a type hint, ``*args`` / ``**kwargs``, a name not matching
  ``^[A-Za-z0-9_-]{1,64}$``, a negative timeout, a type pydantic cannot describe, a duplicate
  name in one registry, or the reserved name ``wait`` (the agent's built-in tool).
- ``execute`` never raises for anything a tool or the model did: every call ends in exactly
  one ``ToolOutcome`` whose ``content`` is what the model reads. The only exception that
  leaves ``execute`` is ``asyncio.CancelledError`` aimed at the task calling it (the tool is
  cancelled first), plus ``BaseException``\\ s that are not ``Exception``\\ s
  (``KeyboardInterrupt``, ``SystemExit``), which are never swallowed.
- A tool runs only when its arguments validated and the run was not already cancelled.
- The event loop is never blocked by a tool: async tools run as tasks; sync tools run on a
  dedicated thread pool (threads named ``meerkat-tool-*``), never the loop's default executor.
- Cancellation (the run's ``cancelled`` event) and timeouts are raced against the tool, not
  polled: ``execute`` returns as soon as either fires. An async tool is then cancelled and
  awaited (for at most ``_CANCEL_GRACE`` seconds, after which it is left to finish alone);
  a sync tool's thread cannot be interrupted, so it is left to finish and its result (or
  exception) is discarded. A sync tool that wants to stop early may poll
  ``context.cancelled.is_set()`` from its thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import inspect
import json
import math
import re
import threading
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, overload

import jsonschema
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError, to_jsonable_python

from ..llm.base import ToolSpec
from .lifecycle import Message, ToolCall

__all__ = [
    "RESERVED_TOOL_NAMES",
    "TOOL_NAME_PATTERN",
    "Tool",
    "ToolContext",
    "ToolFailed",
    "ToolOutcome",
    "ToolRegistry",
    "ToolStatus",
    "schema_tool",
    "tool",
]

TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What a tool name must match (the strictest of the providers' rules)."""

RESERVED_TOOL_NAMES: frozenset[str] = frozenset({"wait"})
"""Names an application tool may not use: the agent's built-in tools."""

ToolStatus = Literal["ok", "error", "timeout", "cancelled", "invalid_arguments", "unknown_tool"]

_CANCEL_GRACE = 1.0
"""Seconds ``execute`` waits for a cancelled async tool to finish before leaving it alone."""

_THREAD_NAME_PREFIX = "meerkat-tool"
_MAX_WORKERS = 32
_RAW_ARGUMENTS_SHOWN = 200


# --- the context a tool may ask for -------------------------------------------------------


@dataclass
class ToolContext:
    """What a tool learns about the call it serves, injected into the parameter annotated
    ``ToolContext`` (any name; that parameter is not part of the tool's schema).

    ``cancelled`` is the run's cancellation event: an async tool may await it, a sync tool may
    poll ``cancelled.is_set()`` from its thread (it must not wait on it there). ``extras`` is a
    per-call shallow copy of what the application passed to ``ToolRegistry.execute``.
    """

    session_id: str
    call_id: str
    cancelled: asyncio.Event
    extras: dict[str, Any] = field(default_factory=dict)


class ToolFailed(Exception):
    """Raise it from a tool to report an error whose ``content`` is exactly what the model
    reads (other exceptions are reported as ``error: <Type>: <message>``)."""

    def __init__(self, content: str) -> None:
        super().__init__(content)
        self.content = content


# --- outcomes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolOutcome:
    """How one tool call ended. ``content`` is what the model reads; ``is_error`` is true for
    every status but ``ok``; ``timeout_ms`` is set only for ``timeout``; ``duration_ms`` is
    the wall time ``execute`` spent on the call (``time.monotonic``)."""

    call_id: str
    name: str
    content: str
    is_error: bool
    status: ToolStatus
    duration_ms: int
    timeout_ms: int | None = None

    def as_message(self) -> Message:
        """The ``tool`` conversation message answering the call."""
        return Message(
            role="tool",
            content=self.content,
            tool_call_id=self.call_id,
            name=self.name,
            is_error=True if self.is_error else None,
        )


# --- tools --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    """How one argument reaches the function: model field ``field`` (``None`` for the
    injected ``ToolContext``) becomes parameter ``parameter``, passed by position when
    ``positional``. A tool's bindings are in signature order."""

    field: str | None
    parameter: str
    positional: bool


@dataclass(frozen=True)
class Tool:
    """A function the model can call. Build it with ``tool`` (or ``ToolRegistry.register``);
    use ``dataclasses.replace`` to change ``name``, ``description`` or ``timeout``.

    ``parameters`` is the JSON Schema object of the arguments (``$defs`` at its top level, so
    every ``$ref`` resolves within it); ``arguments_model`` validates a call's arguments
    against the same schema (its field aliases are the parameter names). ``timeout`` is in
    seconds; ``None`` means the registry's default applies.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = field(repr=False)
    is_async: bool
    timeout: float | None = None
    arguments_model: type[BaseModel] = field(default=BaseModel, repr=False, compare=False)
    context_parameter: str | None = field(default=None, repr=False)
    _bindings: tuple[_Binding, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_timeout(self.timeout, what=f"tool {self.name!r}: timeout")

    def spec(self) -> ToolSpec:
        """What the model is offered (the schema is a copy: callers may change it)."""
        return ToolSpec(
            name=self.name,
            description=self.description,
            parameters=copy.deepcopy(self.parameters),
        )

    async def execute(
        self,
        call: ToolCall,
        *,
        context: ToolContext,
        default_timeout: float | None = None,
    ) -> ToolOutcome:
        """Run one call of this tool and report how it ended (see the module docstring).

        ``default_timeout`` applies when the tool has no ``timeout`` of its own. Raises only
        ``asyncio.CancelledError`` (after cancelling the tool) when the calling task is
        cancelled, and non-``Exception`` ``BaseException``\\ s.
        """
        started = time.monotonic()

        def outcome(status: ToolStatus, content: str, timeout_ms: int | None = None) -> ToolOutcome:
            return ToolOutcome(
                call_id=call.id,
                name=call.name,
                content=content,
                is_error=status != "ok",
                status=status,
                duration_ms=round((time.monotonic() - started) * 1000),
                timeout_ms=timeout_ms,
            )

        if context.cancelled.is_set():
            return outcome("cancelled", _cancelled_text(call.name, started=False))
        if call.raw_arguments is not None:
            shown = call.raw_arguments[:_RAW_ARGUMENTS_SHOWN]
            more = "..." if len(call.raw_arguments) > _RAW_ARGUMENTS_SHOWN else ""
            return outcome(
                "invalid_arguments",
                f"error: invalid arguments for tool {call.name!r}: the arguments are not a "
                f"JSON object: {shown}{more}. "
                f"Expected arguments: {_summarize_schema(self.parameters)}",
            )
        try:
            validated = self.arguments_model.model_validate(call.arguments)
        except ValidationError as exc:
            return outcome(
                "invalid_arguments",
                f"error: invalid arguments for tool {call.name!r}: {_describe_errors(exc)}. "
                f"Expected arguments: {_summarize_schema(self.parameters)}",
            )
        args, kwargs = self._bind(validated, context)
        limit = self.timeout if self.timeout is not None else default_timeout

        try:
            work = self._start(args, kwargs, call)
        except Exception as exc:  # an async callable that raised before returning a coroutine
            return outcome("error", _error_text(exc))
        watcher = asyncio.ensure_future(context.cancelled.wait())
        try:
            done, _ = await asyncio.wait(
                (work, watcher), timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            watcher.cancel()
            await _abandon(work)
            raise
        watcher.cancel()

        if work in done:
            return self._finished(work, outcome)
        await _abandon(work)
        if watcher in done:
            return outcome("cancelled", _cancelled_text(call.name, started=True))
        assert limit is not None  # neither finished: the timeout fired
        return outcome(
            "timeout",
            f"error: tool {call.name!r} timed out after {limit:g} s",
            timeout_ms=round(limit * 1000),
        )

    # -- helpers -----------------------------------------------------------------------

    def _bind(self, validated: BaseModel, context: ToolContext) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments of the function call, in signature order."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for binding in self._bindings:
            value = context if binding.field is None else getattr(validated, binding.field)
            if binding.positional:
                args.append(value)
            else:
                kwargs[binding.parameter] = value
        return args, kwargs

    def _start(
        self, args: list[Any], kwargs: dict[str, Any], call: ToolCall
    ) -> asyncio.Future[Any]:
        """Start the function: a task for an async tool, a pool thread for a sync one."""
        loop = asyncio.get_running_loop()
        if self.is_async:
            awaitable = self.fn(*args, **kwargs)
            if inspect.iscoroutine(awaitable):
                return loop.create_task(awaitable, name=f"meerkat-tool:{self.name}:{call.id}")
            return asyncio.ensure_future(typing.cast(Awaitable[Any], awaitable))
        run = functools.partial(contextvars.copy_context().run, self.fn, *args, **kwargs)
        return loop.run_in_executor(_tool_executor(), run)

    @staticmethod
    def _finished(
        work: asyncio.Future[Any],
        outcome: Callable[[ToolStatus, str], ToolOutcome],
    ) -> ToolOutcome:
        if work.cancelled():  # the tool cancelled itself; the caller was not cancelled
            return outcome("error", "error: CancelledError: the tool was cancelled")
        exc = work.exception()
        if exc is not None:
            if not isinstance(exc, Exception):
                raise exc
            return outcome("error", _error_text(exc))
        return outcome("ok", _render_result(work.result()))


@overload
def tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Tool: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a ``Tool`` of a function: ``@tool``, ``@tool(timeout=5)`` or ``tool(fn, name=...)``.

    The name defaults to the function's ``__name__``; the description to the docstring's text
    before its ``Args:`` section / ``:param`` fields. Parameter descriptions come from
    ``Field(description=...)`` or else the docstring (Google ``Args:`` or reST ``:param x:``).
    Raises ``TypeError`` / ``ValueError`` saying what is wrong with the function.
    """

    def build(f: Callable[..., Any]) -> Tool:
        return _build_tool(f, name=name, description=description, timeout=timeout)

    if fn is None:
        return build
    return build(fn)


# --- the registry -------------------------------------------------------------------------


class ToolRegistry:
    """An application's tools, by name, in registration order.

    Names are unique and never one of ``RESERVED_TOOL_NAMES``. ``default_timeout`` (seconds,
    ``None`` = none) applies to tools without a timeout of their own.
    """

    def __init__(self, *, default_timeout: float | None = None) -> None:
        _check_timeout(default_timeout, what="default_timeout")
        self.default_timeout = default_timeout
        self._tools: dict[str, Tool] = {}

    def register(
        self,
        fn_or_tool: Callable[..., Any] | Tool,
        *,
        name: str | None = None,
        timeout: float | None = None,
        description: str | None = None,
    ) -> Tool:
        """Add a function or ``Tool`` (overriding its name, timeout or description when
        given) and return the registered ``Tool``. Refuses duplicates and reserved names."""
        if isinstance(fn_or_tool, Tool):
            changes: dict[str, Any] = {}
            if name is not None:
                changes["name"] = name
            if timeout is not None:
                changes["timeout"] = timeout
            if description is not None:
                changes["description"] = description
            registered = replace(fn_or_tool, **changes) if changes else fn_or_tool
        else:
            registered = tool(fn_or_tool, name=name, timeout=timeout, description=description)
        if registered.name in RESERVED_TOOL_NAMES:
            raise ValueError(
                f"tool name {registered.name!r} is reserved for the agent's built-in tool; "
                "register it under another name"
            )
        if registered.name in self._tools:
            raise ValueError(f"a tool named {registered.name!r} is already registered")
        self._tools[registered.name] = registered
        return registered

    @overload
    def tool(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Tool: ...

    @overload
    def tool(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Callable[[Callable[..., Any]], Tool]: ...

    def tool(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Tool | Callable[[Callable[..., Any]], Tool]:
        """Decorator form of ``register``: ``@registry.tool`` or ``@registry.tool(timeout=5)``
        (the decorated name is bound to the registered ``Tool``)."""

        def decorate(f: Callable[..., Any]) -> Tool:
            return self.register(f, name=name, description=description, timeout=timeout)

        if fn is None:
            return decorate
        return decorate(fn)

    def merged(self, other: ToolRegistry) -> ToolRegistry:
        """A new registry with this registry's tools followed by ``other``'s; a tool of
        ``other`` replaces one of the same name here (keeping this one's position). The new
        registry's ``default_timeout`` is this one's; ``other``'s tools without a timeout of
        their own keep ``other.default_timeout`` (when it has one). Neither input changes."""
        result = ToolRegistry(default_timeout=self.default_timeout)
        result._tools = dict(self._tools)
        for name, found in other._tools.items():
            if found.timeout is None and other.default_timeout is not None:
                found = replace(found, timeout=other.default_timeout)
            result._tools[name] = found
        return result

    def unregister(self, name: str) -> Tool | None:
        """Remove the tool called ``name``; the removed ``Tool`` (None when there was none).
        Runs already executing it finish; later model calls are no longer offered it."""
        return self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[ToolSpec]:
        """The tools as offered to the model, in registration order."""
        return [t.spec() for t in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    async def execute(
        self,
        call: ToolCall,
        *,
        session_id: str,
        cancelled: asyncio.Event,
        extras: Mapping[str, Any] | None = None,
    ) -> ToolOutcome:
        """Run one tool call (see ``Tool.execute``); an unknown name runs nothing and reports
        ``unknown_tool`` with the names available."""
        found = self._tools.get(call.name)
        if found is None:
            available = ", ".join(self._tools) or "none"
            return ToolOutcome(
                call_id=call.id,
                name=call.name,
                content=f"error: unknown tool {call.name!r}; available tools: {available}",
                is_error=True,
                status="unknown_tool",
                duration_ms=0,
            )
        context = ToolContext(
            session_id=session_id,
            call_id=call.id,
            cancelled=cancelled,
            extras=dict(extras) if extras else {},
        )
        return await found.execute(call, context=context, default_timeout=self.default_timeout)


# --- building a tool from a function ------------------------------------------------------


class _SchemaGenerator(GenerateJsonSchema):
    """pydantic's generator without per-field ``title`` noise."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid tool name {name!r}: it must be 1 to 64 characters of letters, digits, "
            "'_' or '-' (pass name=... to choose one)"
        )


def _check_timeout(timeout: float | None, *, what: str) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{what} must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what} must be a non-negative number of seconds, not {timeout!r}")


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _is_context_annotation(annotation: Any) -> bool:
    if annotation is ToolContext:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [ToolContext]
    return False


def _has_description(annotation: Any, default: Any) -> bool:
    if isinstance(default, FieldInfo) and default.description is not None:
        return True
    if typing.get_origin(annotation) is Annotated:
        return any(
            isinstance(m, FieldInfo) and m.description is not None for m in annotation.__metadata__
        )
    return False


def _build_tool(
    fn: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    timeout: float | None,
) -> Tool:
    if not callable(fn):
        raise TypeError(f"a tool must be a function, not {fn!r}")
    tool_name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
    _check_name(tool_name)
    _check_timeout(timeout, what=f"tool {tool_name!r}: timeout")

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {tool_name!r}: cannot read the function's signature: {exc}") from exc
    hint_target = fn.__call__ if not inspect.isroutine(fn) and hasattr(fn, "__call__") else fn  # noqa: B004
    while isinstance(hint_target, functools.partial):
        hint_target = hint_target.func
    try:
        hints = typing.get_type_hints(hint_target, include_extras=True)
    except Exception as exc:
        raise TypeError(
            f"tool {tool_name!r}: cannot resolve the type hints ({type(exc).__name__}: {exc}); "
            "types named in annotations must be importable from the function's module"
        ) from exc

    doc_description, doc_params = _parse_docstring(inspect.getdoc(fn) or "")
    fields: dict[str, Any] = {}
    bindings: list[_Binding] = []
    context_parameter: str | None = None
    for index, parameter in enumerate(signature.parameters.values()):
        pname = parameter.name
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            star = "*" if parameter.kind is parameter.VAR_POSITIONAL else "**"
            raise TypeError(
                f"tool {tool_name!r}: {star}{pname} is not supported; "
                "a tool's parameters must be named and typed"
            )
        if pname not in hints:
            raise TypeError(
                f"tool {tool_name!r}: parameter {pname!r} has no type hint; "
                "every parameter needs one (it defines the JSON Schema the model sees)"
            )
        annotation = hints[pname]
        positional = parameter.kind is parameter.POSITIONAL_ONLY
        if _is_context_annotation(annotation):
            if context_parameter is not None:
                raise TypeError(
                    f"tool {tool_name!r}: only one parameter may be a ToolContext "
                    f"({context_parameter!r} and {pname!r} both are)"
                )
            context_parameter = pname
            bindings.append(_Binding(None, pname, positional))
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        extra: dict[str, Any] = {"alias": pname}
        if pname in doc_params and not _has_description(annotation, default):
            extra["description"] = doc_params[pname]
        # Internal field names avoid clashes with BaseModel attributes and leading
        # underscores; the alias carries the parameter name into schema and validation.
        field_name = f"p{index}"
        fields[field_name] = (Annotated[annotation, Field(**extra)], default)
        bindings.append(_Binding(field_name, pname, positional))

    try:
        model = create_model(
            f"{tool_name.replace('-', '_')}_arguments",
            __config__=ConfigDict(extra="forbid"),
            **fields,
        )
        schema = model.model_json_schema(schema_generator=_SchemaGenerator)
    except Exception as exc:
        raise TypeError(
            f"tool {tool_name!r}: the parameter types cannot be described as JSON Schema "
            f"({type(exc).__name__}: {exc})"
        ) from exc

    parameters: dict[str, Any] = {
        "type": "object",
        "properties": schema.get("properties", {}),
        "required": schema.get("required", []),
        "additionalProperties": False,
    }
    if "$defs" in schema:
        parameters["$defs"] = schema["$defs"]

    return Tool(
        name=tool_name,
        description=description if description is not None else doc_description,
        parameters=parameters,
        fn=fn,
        is_async=_is_async_callable(fn),
        timeout=timeout,
        arguments_model=typing.cast(type[BaseModel], model),
        context_parameter=context_parameter,
        _bindings=tuple(bindings),
    )


# --- building a tool from a JSON Schema ----------------------------------------------------


def schema_tool(
    name: str,
    parameters: Mapping[str, Any],
    handler: Callable[[dict[str, Any], ToolContext], Awaitable[Any]],
    *,
    description: str = "",
    timeout: float | None = None,
) -> Tool:
    """A ``Tool`` described by a raw JSON Schema (``parameters``) and run by an async
    ``handler(arguments, context)``: for tools implemented elsewhere (a client process, a
    remote service). A call's arguments are validated against the schema before the handler
    runs (invalid ones are reported to the model and nothing runs); the handler's return value
    is rendered like any tool's; raising ``ToolFailed(content)`` reports an error with exactly
    that content. Raises ``ValueError`` / ``TypeError`` for a bad name, timeout or schema (it
    must be a valid JSON Schema whose ``type``, when given, is ``object``) or a handler that
    is not async.
    """
    _check_name(name)
    _check_timeout(timeout, what=f"tool {name!r}: timeout")
    if not _is_async_callable(handler):
        raise TypeError(f"tool {name!r}: the handler must be an async function")
    if not isinstance(parameters, Mapping):
        raise ValueError(
            f"tool {name!r}: the parameters schema must be a JSON object, got "
            f"{type(parameters).__name__}"
        )
    schema = copy.deepcopy(dict(parameters))
    kind = schema.get("type")
    if kind is not None and kind != "object":
        raise ValueError(
            f"tool {name!r}: the parameters schema must describe an object "
            f'("type": "object"), got type {kind!r}'
        )
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(
            f"tool {name!r}: the parameters are not a valid JSON Schema: {exc.message}"
        ) from None
    validator = cls(schema)

    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise PydanticCustomError("not_an_object", "the arguments must be a JSON object")
        errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.path])
        if errors:
            problems = "; ".join(
                f"{'/'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                for e in errors[:5]
            )
            raise PydanticCustomError("schema", "{problems}", {"problems": problems})
        return value

    class _SchemaArguments(BaseModel):
        model_config = ConfigDict(extra="forbid")
        arguments: dict[str, Any]

        @model_validator(mode="before")
        @classmethod
        def _against_schema(cls, data: Any) -> Any:
            return {"arguments": check(data)}

    return Tool(
        name=name,
        description=description,
        parameters=schema,
        fn=handler,
        is_async=True,
        timeout=timeout,
        arguments_model=_SchemaArguments,
        context_parameter="context",
        _bindings=(_Binding("arguments", "arguments", True), _Binding(None, "context", True)),
    )


# --- docstrings ---------------------------------------------------------------------------

_GOOGLE_ARGS = re.compile(
    r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters)"
    r"\s*:\s*$"
)
_GOOGLE_ITEM = re.compile(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_PARAM = re.compile(
    r"^:(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:]*?\s+)?\*{0,2}([A-Za-z_]\w*)"
    r"\s*:\s*(.*)$"
)
_REST_FIELD = re.compile(r"^:[A-Za-z]+(?:\s+[^:]*)?:")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (text before the first ``Args:`` section or reST field) and the
    parameter descriptions found in Google ``Args:`` sections and reST ``:param`` fields."""
    lines = doc.expandtabs().splitlines()
    params: dict[str, str] = {}
    end = len(lines)
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if _GOOGLE_ARGS.match(stripped):
            end = min(end, i)
            i = _parse_google_section(lines, i, params)
            continue
        if _REST_FIELD.match(stripped):
            end = min(end, i)
            match = _REST_PARAM.match(stripped)
            i += 1
            if match is None:
                continue
            parts = [match.group(2).strip()]
            while i < len(lines) and lines[i].strip() and not _REST_FIELD.match(lines[i].strip()):
                parts.append(lines[i].strip())
                i += 1
            params[match.group(1)] = " ".join(p for p in parts if p)
            continue
        i += 1
    return "\n".join(lines[:end]).strip(), params


def _parse_google_section(lines: list[str], header: int, params: dict[str, str]) -> int:
    """Read the items of the ``Args:``-style section at ``lines[header]`` into ``params``;
    return the index of the first line after the section."""
    header_indent = _indent(lines[header])
    item_indent: int | None = None
    current: str | None = None
    i = header + 1
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        indent = _indent(line)
        if indent <= header_indent:
            break
        if item_indent is None:
            item_indent = indent
        match = _GOOGLE_ITEM.match(line.strip()) if indent <= item_indent else None
        if match is not None:
            current = match.group(1)
            params[current] = match.group(2).strip()
        elif current is not None:
            params[current] = f"{params[current]} {line.strip()}".strip()
        i += 1
    return i


# --- result and error text ----------------------------------------------------------------


def _render_result(value: Any) -> str:
    """``str`` as is, ``None`` as ``null``, anything else as compact JSON (``str(value)``
    when it cannot be serialised)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    try:
        return json.dumps(to_jsonable_python(value), separators=(",", ":"), ensure_ascii=False)
    except Exception:
        try:
            return str(value)
        except Exception:
            return object.__repr__(value)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ToolFailed):
        return exc.content
    message = str(exc)
    return f"error: {type(exc).__name__}: {message}" if message else f"error: {type(exc).__name__}"


def _cancelled_text(name: str, *, started: bool) -> str:
    if started:
        return f"error: tool {name!r} was cancelled because the run was cancelled"
    return f"error: tool {name!r} was not run because the run was cancelled"


def _describe_errors(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def _summarize_schema(parameters: Mapping[str, Any]) -> str:
    """A one-line reminder of the expected arguments, e.g.
    ``{a: integer (required), tags: array of string = []}``."""
    properties: Mapping[str, Any] = parameters.get("properties", {})
    if not properties:
        return "none (pass an empty object)"
    required = set(parameters.get("required", []))
    defs: Mapping[str, Any] = parameters.get("$defs", {})
    parts = []
    for pname, sub in properties.items():
        label = f"{pname}: {_type_label(sub, defs)}"
        if pname in required:
            label += " (required)"
        elif "default" in sub:
            label += f" = {_compact_or_repr(sub['default'])}"
        parts.append(label)
    return "{" + ", ".join(parts) + "}"


def _type_label(schema: Mapping[str, Any], defs: Mapping[str, Any], depth: int = 0) -> str:
    if depth > 4:
        return "..."
    if "$ref" in schema:
        ref_name = str(schema["$ref"]).rsplit("/", 1)[-1]
        target = defs.get(ref_name, {})
        return _type_label(target, defs, depth + 1) if "enum" in target else ref_name
    if "enum" in schema:
        return "one of " + "|".join(_compact_or_repr(v) for v in schema["enum"])
    if "const" in schema:
        return _compact_or_repr(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type_label(s, defs, depth + 1) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return f"array of {_type_label(items, defs, depth + 1)}" if items else "array"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    return str(kind) if kind else "any"


def _compact_or_repr(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


# --- running ------------------------------------------------------------------------------

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _tool_executor() -> ThreadPoolExecutor:
    """The pool sync tools run on, created on first use (threads ``meerkat-tool-N``)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=_MAX_WORKERS, thread_name_prefix=_THREAD_NAME_PREFIX
            )
        return _executor


async def _abandon(work: asyncio.Future[Any]) -> None:
    """Stop waiting for a tool. A task is cancelled and awaited for up to ``_CANCEL_GRACE``
    seconds; a thread's future is cancelled so its eventual result is dropped (the thread
    itself runs on). Whatever the work ends with is retrieved, so nothing is logged as
    never retrieved."""
    work.cancel()
    if not isinstance(work, asyncio.Task):
        return
    if not work.done():
        await asyncio.wait((work,), timeout=_CANCEL_GRACE)
    if work.done():
        _consume(work)
    else:
        work.add_done_callback(_consume)


def _consume(work: asyncio.Future[Any]) -> None:
    if not work.cancelled():
        work.exception()
