"""Application tools: schema generation, registration, and execution semantics (results,
errors, invalid arguments, timeouts, cancellation, threads)."""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field

from meerkat_runtime.core.lifecycle import ToolCall
from meerkat_runtime.core.tools import (
    RESERVED_TOOL_NAMES,
    Tool,
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    tool,
)
from meerkat_runtime.llm.base import ToolSpec


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(BaseModel):
    x: int
    y: int = 0


class Unsupported:
    """A plain class pydantic cannot describe."""


def call(name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> ToolCall:
    return ToolCall(id=kw.pop("id", "c1"), name=name, arguments=arguments or {}, **kw)


async def run(
    registry: ToolRegistry,
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    cancelled: asyncio.Event | None = None,
    **kw: Any,
) -> ToolOutcome:
    return await registry.execute(
        call(name, arguments, **kw),
        session_id="s1",
        cancelled=cancelled if cancelled is not None else asyncio.Event(),
    )


def registry_with(*fns: Any, **kw: Any) -> ToolRegistry:
    registry = ToolRegistry(**kw)
    for fn in fns:
        registry.register(fn)
    return registry


# --- schema generation --------------------------------------------------------------------


def test_schema_for_scalars_defaults_optional_and_lists() -> None:
    def search(
        query: str,
        limit: int = 10,
        lang: str | None = None,
        tags: list[str] = [],  # noqa: B006
    ) -> str:
        return ""

    t = tool(search)
    assert t.name == "search"
    assert t.parameters["type"] == "object"
    assert t.parameters["required"] == ["query"]
    props = t.parameters["properties"]
    assert list(props) == ["query", "limit", "lang", "tags"]
    assert props["query"] == {"type": "string"}
    assert props["limit"] == {"type": "integer", "default": 10}
    assert props["lang"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert "title" not in t.parameters


def test_schema_for_literal_enum_nested_model_and_field_descriptions() -> None:
    def draw(
        shape: Literal["circle", "square"],
        color: Color,
        at: Point,
        size: Annotated[float, Field(description="edge length in cm", gt=0)] = 1.0,
    ) -> None:
        """Draw a shape.

        Args:
            size: the docstring loses to Field(description=...)
            at: where to draw it
        """

    params = tool(draw).parameters
    props = params["properties"]
    assert props["shape"] == {"type": "string", "enum": ["circle", "square"]}
    assert props["color"] == {"$ref": "#/$defs/Color"}
    assert params["$defs"]["Color"]["enum"] == ["red", "blue"]
    assert props["at"] == {"$ref": "#/$defs/Point", "description": "where to draw it"}
    point = params["$defs"]["Point"]
    assert point["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer", "default": 0}}
    assert point["required"] == ["x"]
    assert props["size"]["description"] == "edge length in cm"
    assert props["size"]["exclusiveMinimum"] == 0
    assert params["required"] == ["shape", "color", "at"]


def test_every_ref_resolves_inside_the_schema() -> None:
    def place(points: list[Point], color: Color | None = None) -> None: ...

    params = tool(place).parameters

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    found = refs(params)
    assert found
    for ref in found:
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in params["$defs"]


def test_google_docstring_gives_description_and_parameter_descriptions() -> None:
    def weather(city: str, days: int = 1) -> str:
        """Look up the weather forecast.

        Uses the national service.

        Args:
            city (str): The city name,
                as the user wrote it.
            days: How many days ahead.

        Returns:
            A short forecast.
        """
        return ""

    t = tool(weather)
    assert t.description == "Look up the weather forecast.\n\nUses the national service."
    props = t.parameters["properties"]
    assert props["city"]["description"] == "The city name, as the user wrote it."
    assert props["days"]["description"] == "How many days ahead."


def test_rest_docstring_gives_description_and_parameter_descriptions() -> None:
    def convert(amount: float, currency: str) -> float:
        """Convert money.

        :param amount: How much,
            in the source currency.
        :param str currency: ISO code of the target.
        :returns: the converted amount
        """
        return amount

    t = tool(convert)
    assert t.description == "Convert money."
    props = t.parameters["properties"]
    assert props["amount"]["description"] == "How much, in the source currency."
    assert props["currency"]["description"] == "ISO code of the target."


def test_explicit_description_and_name_override_the_function() -> None:
    def f(x: int) -> int:
        """Docstring."""
        return x

    t = tool(f, name="double-it", description="Doubles.")
    assert (t.name, t.description) == ("double-it", "Doubles.")
    assert t.spec() == ToolSpec(name="double-it", description="Doubles.", parameters=t.parameters)


def test_tool_context_parameter_is_excluded_from_the_schema() -> None:
    def f(ctx: ToolContext, x: int) -> None: ...

    def g(x: int, /, context: ToolContext | None = None) -> None: ...

    assert tool(f).context_parameter == "ctx"
    assert tool(f).parameters["properties"] == {"x": {"type": "integer"}}
    assert tool(g).context_parameter == "context"
    assert list(tool(g).parameters["properties"]) == ["x"]


def test_parameter_names_that_clash_with_pydantic_attributes_work() -> None:
    def f(json: str, model_config: int = 0, schema: bool = False) -> str:
        return f"{json}{model_config}{schema}"

    t = tool(f)
    assert list(t.parameters["properties"]) == ["json", "model_config", "schema"]


def test_spec_returns_a_copy() -> None:
    def f(x: int) -> None: ...

    t = tool(f)
    t.spec().parameters["properties"]["x"]["type"] = "string"
    assert t.parameters["properties"]["x"]["type"] == "integer"


def test_decorator_forms() -> None:
    @tool
    def plain(x: int) -> int:
        return x

    @tool(timeout=5, name="named")
    async def configured(x: int) -> int:
        return x

    assert isinstance(plain, Tool) and plain.timeout is None and not plain.is_async
    assert isinstance(configured, Tool)
    assert (configured.name, configured.timeout, configured.is_async) == ("named", 5, True)


# --- registration -------------------------------------------------------------------------


def test_registry_registers_in_order_and_decorates() -> None:
    registry = ToolRegistry(default_timeout=3)

    def first(x: int) -> int:
        return x

    registry.register(first)

    @registry.tool
    def second() -> None: ...

    @registry.tool(name="third", timeout=1)
    def renamed() -> None: ...

    registry.register(tool(first, name="fourth"), timeout=2, description="again")

    assert registry.names() == ["first", "second", "third", "fourth"]
    assert [s.name for s in registry.specs()] == registry.names()
    assert isinstance(second, Tool) and isinstance(renamed, Tool)
    assert "third" in registry and "renamed" not in registry
    assert len(registry) == 4
    fourth = registry.get("fourth")
    assert fourth is not None and (fourth.timeout, fourth.description) == (2, "again")
    assert registry.get("missing") is None
    assert registry.default_timeout == 3


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: tool(lambda x: x), ValueError, "invalid tool name '<lambda>'"),
        (lambda: tool(lambda: None, name="has space"), ValueError, "invalid tool name"),
        (lambda: tool(lambda: None, name="x" * 65), ValueError, "invalid tool name"),
        (lambda: tool(lambda: None, name=""), ValueError, "invalid tool name"),
        (lambda: tool(lambda: None, name="ok", timeout=-1), ValueError, "non-negative"),
        (lambda: tool(lambda: None, name="ok", timeout=float("nan")), ValueError, "non-negative"),
        (lambda: ToolRegistry(default_timeout=-0.5), ValueError, "default_timeout"),
    ],
)
def test_bad_names_and_timeouts_are_refused(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_parameter_without_type_hint_is_refused() -> None:
    def f(x: int, y) -> None:  # type: ignore[no-untyped-def]
        ...

    with pytest.raises(TypeError, match="parameter 'y' has no type hint"):
        tool(f)


def test_star_args_and_kwargs_are_refused() -> None:
    def f(*items: int) -> None: ...

    def g(**options: str) -> None: ...

    with pytest.raises(TypeError, match=r"\*items is not supported"):
        tool(f)
    with pytest.raises(TypeError, match=r"\*\*options is not supported"):
        tool(g)


def test_two_context_parameters_are_refused() -> None:
    def f(a: ToolContext, b: ToolContext) -> None: ...

    with pytest.raises(TypeError, match="only one parameter may be a ToolContext"):
        tool(f)


def test_undescribable_and_unresolvable_types_are_refused() -> None:
    def f(x: Unsupported) -> None: ...

    with pytest.raises(TypeError, match="cannot be described as JSON Schema"):
        tool(f)

    def g(x: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(TypeError, match="cannot resolve the type hints"):
        tool(g)


def test_duplicate_and_reserved_names_are_refused() -> None:
    registry = ToolRegistry()

    def f() -> None: ...

    def wait(seconds: float) -> None: ...

    registry.register(f)
    with pytest.raises(ValueError, match="'f' is already registered"):
        registry.register(f)
    assert "wait" in RESERVED_TOOL_NAMES
    with pytest.raises(ValueError, match="'wait' is reserved"):
        registry.register(wait)
    with pytest.raises(ValueError, match="'wait' is reserved"):
        registry.register(f, name="wait")
    assert registry.names() == ["f"]


def test_merged_registry_layers_tools_without_changing_either() -> None:
    def a() -> str:
        return "base a"

    def b() -> str:
        return "base b"

    def b_override() -> str:
        return "session b"

    def c() -> str:
        return "session c"

    base = ToolRegistry(default_timeout=10)
    base.register(a)
    base.register(b)
    session = ToolRegistry(default_timeout=2)
    session.register(b_override, name="b")
    session.register(c, timeout=5)

    merged = base.merged(session)
    assert merged.names() == ["a", "b", "c"]
    assert merged.default_timeout == 10
    got_b, got_c = merged.get("b"), merged.get("c")
    assert got_b is not None and got_b.fn is b_override and got_b.timeout == 2
    assert got_c is not None and got_c.timeout == 5
    assert base.names() == ["a", "b"] and session.names() == ["b", "c"]
    assert base.get("b") is not None and base.get("b").fn is b  # type: ignore[union-attr]


# --- execution: results -------------------------------------------------------------------


async def test_sync_and_async_tools_return_their_results() -> None:
    def add(a: int, b: int = 1) -> int:
        return a + b

    async def greet(name: str) -> str:
        await asyncio.sleep(0)
        return f"hello {name}"

    registry = registry_with(add, greet)
    added = await run(registry, "add", {"a": 2, "b": 3}, id="call-7")
    assert added == ToolOutcome(
        call_id="call-7",
        name="add",
        content="5",
        is_error=False,
        status="ok",
        duration_ms=added.duration_ms,
    )
    assert (await run(registry, "add", {"a": "41"})).content == "42"  # lax coercion
    greeted = await run(registry, "greet", {"name": "Ada"})
    assert (greeted.status, greeted.content, greeted.is_error) == ("ok", "hello Ada", False)


async def test_arguments_arrive_typed() -> None:
    seen: dict[str, Any] = {}

    def f(at: Point, color: Color, tags: list[str], mode: Literal["a", "b"] = "a") -> None:
        seen.update(at=at, color=color, tags=tags, mode=mode)

    registry = registry_with(f)
    outcome = await run(registry, "f", {"at": {"x": 1}, "color": "blue", "tags": ["t"]})
    assert outcome.status == "ok"
    assert seen == {"at": Point(x=1, y=0), "color": Color.BLUE, "tags": ["t"], "mode": "a"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain text", "plain text"),
        (None, "null"),
        ({"b": [1, 2.5, True], "a": "é"}, '{"b":[1,2.5,true],"a":"é"}'),
        ([Point(x=1), Color.RED], '[{"x":1,"y":0},"red"]'),
        (3, "3"),
        ("", ""),
    ],
)
async def test_results_are_rendered_for_the_model(value: Any, expected: str) -> None:
    def f() -> Any:
        return value

    assert (await run(registry_with(f), "f")).content == expected


async def test_unserialisable_result_falls_back_to_str() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "<opaque thing>"

    def f() -> Any:
        return Opaque()

    outcome = await run(registry_with(f), "f")
    assert (outcome.status, outcome.content) == ("ok", "<opaque thing>")


async def test_context_is_injected() -> None:
    seen: list[ToolContext] = []

    def sync_tool(ctx: ToolContext, x: int) -> int:
        seen.append(ctx)
        return x

    async def async_tool(x: int, /, context: ToolContext | None = None) -> int:
        assert context is not None
        seen.append(context)
        return x

    registry = registry_with(sync_tool, async_tool)
    cancelled = asyncio.Event()
    extras = {"db": "handle"}
    for name in ("sync_tool", "async_tool"):
        outcome = await registry.execute(
            call(name, {"x": 4}, id=f"id-{name}"),
            session_id="sess",
            cancelled=cancelled,
            extras=extras,
        )
        assert outcome.content == "4"
    assert [(c.session_id, c.call_id, c.extras) for c in seen] == [
        ("sess", "id-sync_tool", extras),
        ("sess", "id-async_tool", extras),
    ]
    assert all(c.cancelled is cancelled for c in seen)
    assert seen[0].extras is not extras  # a per-call copy


async def test_sync_tools_run_on_meerkat_tool_threads_and_async_on_the_loop() -> None:
    def where() -> str:
        return threading.current_thread().name

    async def where_async() -> str:
        return threading.current_thread().name

    registry = registry_with(where, where_async)
    assert (await run(registry, "where")).content.startswith("meerkat-tool")
    assert (await run(registry, "where_async")).content == threading.current_thread().name


async def test_calls_of_one_turn_run_in_parallel() -> None:
    def slow(n: int) -> int:
        time.sleep(0.1)
        return n

    async def slow_async(n: int) -> int:
        await asyncio.sleep(0.1)
        return n

    registry = registry_with(slow, slow_async)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(run(registry, "slow", {"n": i}, id=str(i)) for i in range(3)),
        *(run(registry, "slow_async", {"n": i}, id=f"a{i}") for i in range(3)),
    )
    assert time.monotonic() - started < 0.25
    assert [o.content for o in outcomes] == ["0", "1", "2", "0", "1", "2"]
    assert all(o.duration_ms >= 90 for o in outcomes)


# --- execution: failures ------------------------------------------------------------------


async def test_raising_tools_report_errors() -> None:
    def boom() -> None:
        raise ValueError("bad input")

    async def boom_async() -> None:
        await asyncio.sleep(0)
        raise KeyError("k")

    def quiet() -> None:
        raise RuntimeError

    registry = registry_with(boom, boom_async, quiet)
    outcome = await run(registry, "boom")
    assert (outcome.status, outcome.is_error) == ("error", True)
    assert outcome.content == "error: ValueError: bad input"
    assert (await run(registry, "boom_async")).content == "error: KeyError: 'k'"
    assert (await run(registry, "quiet")).content == "error: RuntimeError"


async def test_invalid_arguments_are_reported_and_nothing_runs() -> None:
    ran: list[int] = []

    def add(a: int, b: int = 1) -> int:
        ran.append(a)
        return a + b

    registry = registry_with(add)

    wrong = await run(registry, "add", {"a": "many"})
    assert (wrong.status, wrong.is_error) == ("invalid_arguments", True)
    assert "tool 'add'" in wrong.content
    assert "a: Input should be a valid integer" in wrong.content
    assert "a: integer (required)" in wrong.content and "b: integer = 1" in wrong.content

    missing = await run(registry, "add", {"b": 2})
    assert "a: Field required" in missing.content

    extra = await run(registry, "add", {"a": 1, "c": 2})
    assert "c: Extra inputs are not permitted" in extra.content

    raw = await run(registry, "add", raw_arguments='{"a": 1')
    assert raw.status == "invalid_arguments"
    assert "not a JSON object" in raw.content and '{"a": 1' in raw.content

    assert ran == []


async def test_nested_argument_errors_name_the_path() -> None:
    def f(at: Point) -> None: ...

    outcome = await run(registry_with(f), "f", {"at": {"x": "left"}})
    assert "at.x: Input should be a valid integer" in outcome.content


async def test_unknown_tool_lists_the_available_ones() -> None:
    def alpha() -> None: ...

    def beta() -> None: ...

    outcome = await run(registry_with(alpha, beta), "gamma", raw_arguments="junk")
    assert (outcome.status, outcome.is_error, outcome.name) == ("unknown_tool", True, "gamma")
    assert outcome.content == "error: unknown tool 'gamma'; available tools: alpha, beta"
    assert (await run(ToolRegistry(), "x")).content.endswith("available tools: none")


# --- execution: timeouts ------------------------------------------------------------------


async def test_async_tool_timeout_cancels_the_tool() -> None:
    saw_cancel = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    registry = ToolRegistry()
    registry.register(hang, timeout=0.05)
    started = time.monotonic()
    outcome = await run(registry, "hang")
    assert time.monotonic() - started < 1
    assert (outcome.status, outcome.is_error, outcome.timeout_ms) == ("timeout", True, 50)
    assert outcome.content == "error: tool 'hang' timed out after 0.05 s"
    assert outcome.duration_ms >= 50
    assert saw_cancel.is_set()


async def test_registry_default_timeout_applies_unless_the_tool_has_its_own() -> None:
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    registry = ToolRegistry(default_timeout=0.05)
    registry.register(nap)
    registry.register(nap, name="long_nap", timeout=1)
    assert (await run(registry, "nap", {"seconds": 0.5})).status == "timeout"
    assert (await run(registry, "nap", {"seconds": 0})).content == "rested"
    assert (await run(registry, "long_nap", {"seconds": 0.1})).content == "rested"


async def test_sync_tool_timeout_leaves_the_thread_running_without_blocking_the_loop() -> None:
    release = threading.Event()
    finished = threading.Event()

    def block() -> str:
        release.wait(5)
        finished.set()
        return "late result"

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    registry = ToolRegistry(default_timeout=0.15)
    registry.register(block)
    ticking = asyncio.create_task(ticker())
    try:
        outcome = await run(registry, "block")
    finally:
        ticking.cancel()
    assert (outcome.status, outcome.timeout_ms) == ("timeout", 150)
    assert ticks >= 5  # the loop kept running while the thread blocked
    assert not finished.is_set()  # the thread is still running
    release.set()
    assert await asyncio.to_thread(finished.wait, 2)
    await asyncio.sleep(0.02)  # the late result is dropped without complaint


# --- execution: cancellation --------------------------------------------------------------


async def test_cancelling_the_run_cancels_an_async_tool_promptly() -> None:
    started = asyncio.Event()
    saw_cancel = asyncio.Event()

    async def hang() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    cancelled = asyncio.Event()
    pending = asyncio.create_task(run(registry_with(hang), "hang", cancelled=cancelled))
    await started.wait()
    set_at = time.monotonic()
    cancelled.set()
    outcome = await pending
    assert time.monotonic() - set_at < 0.2
    assert (outcome.status, outcome.is_error, outcome.timeout_ms) == ("cancelled", True, None)
    assert "cancelled" in outcome.content
    assert saw_cancel.is_set()


async def test_cancelling_the_run_abandons_a_sync_tool_promptly() -> None:
    entered = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def block() -> str:
        entered.set()
        release.wait(5)
        finished.set()
        return "late"

    cancelled = asyncio.Event()
    pending = asyncio.create_task(run(registry_with(block), "block", cancelled=cancelled))
    assert await asyncio.to_thread(entered.wait, 2)
    set_at = time.monotonic()
    cancelled.set()
    outcome = await pending
    assert time.monotonic() - set_at < 0.2
    assert outcome.status == "cancelled"
    assert not finished.is_set()  # the thread keeps running
    release.set()
    assert await asyncio.to_thread(finished.wait, 2)


async def test_nothing_runs_when_the_run_is_already_cancelled() -> None:
    ran: list[str] = []

    def f() -> None:
        ran.append("f")

    cancelled = asyncio.Event()
    cancelled.set()
    outcome = await run(registry_with(f), "f", cancelled=cancelled)
    assert (outcome.status, outcome.duration_ms) == ("cancelled", 0)
    assert "not run" in outcome.content
    assert ran == []


async def test_cancelling_the_caller_cancels_the_tool_and_propagates() -> None:
    started = asyncio.Event()
    saw_cancel = asyncio.Event()

    async def hang() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    caller = asyncio.create_task(run(registry_with(hang), "hang"))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert saw_cancel.is_set()


async def test_a_tool_cancelling_itself_is_an_error_not_a_cancellation() -> None:
    async def self_cancel() -> None:
        raise asyncio.CancelledError

    outcome = await run(registry_with(self_cancel), "self_cancel")
    assert (outcome.status, outcome.content) == (
        "error",
        "error: CancelledError: the tool was cancelled",
    )


def test_outcome_as_message() -> None:
    ok = ToolOutcome("c", "f", "1", False, "ok", 3)
    failed = ToolOutcome("c", "f", "error: x", True, "error", 3)
    message = ok.as_message()
    assert (message.role, message.content, message.tool_call_id, message.name) == (
        "tool",
        "1",
        "c",
        "f",
    )
    assert message.is_error is None
    assert failed.as_message().is_error is True


# --- tools from a raw JSON Schema ---------------------------------------------------------


async def test_schema_tool_validates_against_the_schema_and_passes_the_arguments() -> None:
    from meerkat_runtime.core.tools import ToolFailed, schema_tool

    seen: list[tuple[dict[str, Any], str]] = []

    async def handler(arguments: dict[str, Any], context: ToolContext) -> Any:
        seen.append((arguments, context.call_id))
        if arguments.get("fail"):
            raise ToolFailed("the lookup service said no")
        return {"echo": arguments["q"]}

    schema = {
        "type": "object",
        "properties": {"q": {"type": "string"}, "fail": {"type": "boolean"}},
        "required": ["q"],
    }
    registry = ToolRegistry()
    registered = registry.register(schema_tool("lookup", schema, handler, description="Look up"))
    assert registered.spec() == ToolSpec(name="lookup", description="Look up", parameters=schema)

    ok = await run(registry, "lookup", {"q": "x"})
    assert (ok.status, ok.content, ok.is_error) == ("ok", '{"echo":"x"}', False)
    assert seen == [({"q": "x"}, "c1")]

    failed = await run(registry, "lookup", {"q": "x", "fail": True})
    assert (failed.status, failed.content, failed.is_error) == (
        "error",
        "the lookup service said no",
        True,
    )

    bad = await run(registry, "lookup", {"q": 3})
    assert bad.status == "invalid_arguments"
    assert "q: 3 is not of type 'string'" in bad.content
    missing = await run(registry, "lookup", {})
    assert missing.status == "invalid_arguments" and "'q' is a required property" in missing.content
    assert len(seen) == 2  # nothing ran for invalid arguments


async def test_schema_tool_honours_cancellation_and_timeout() -> None:
    from meerkat_runtime.core.tools import schema_tool

    started = asyncio.Event()
    cancelled_inside = asyncio.Event()

    async def slow(arguments: dict[str, Any], context: ToolContext) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled_inside.set()
            raise
        return "late"

    registry = ToolRegistry()
    registry.register(schema_tool("slow", {"type": "object"}, slow))
    cancel = asyncio.Event()
    task = asyncio.ensure_future(run(registry, "slow", {}, cancelled=cancel))
    await started.wait()
    cancel.set()
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.status == "cancelled" and cancelled_inside.is_set()

    registry.register(schema_tool("slow2", {"type": "object"}, slow, timeout=0.05))
    timed = await run(registry, "slow2", {})
    assert timed.status == "timeout"


def test_schema_tool_refuses_bad_definitions_and_registry_unregisters() -> None:
    from meerkat_runtime.core.tools import schema_tool

    async def handler(arguments: dict[str, Any], context: ToolContext) -> str:
        return "ok"

    def sync_handler(arguments: dict[str, Any], context: ToolContext) -> str:
        return "ok"

    with pytest.raises(ValueError, match="invalid tool name"):
        schema_tool("bad name", {"type": "object"}, handler)
    with pytest.raises(ValueError, match="must describe an object"):
        schema_tool("t", {"type": "string"}, handler)
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        schema_tool("t", {"type": "object", "properties": 3}, handler)
    with pytest.raises(TypeError, match="async"):
        schema_tool("t", {"type": "object"}, sync_handler)  # type: ignore[arg-type]

    registry = ToolRegistry()
    first = registry.register(schema_tool("t", {"type": "object"}, handler))
    assert registry.unregister("t") is first
    assert registry.unregister("t") is None
    assert "t" not in registry
    registry.register(schema_tool("t", {"type": "object"}, handler, description="again"))
    assert registry.names() == ["t"]
