"""Regression tests for two session-service fixes: a retried first turn of a deferred session
deduplicates (S11: the same content as the first attempt), and a per-turn ``provider``
override builds the model for that provider instead of reusing one cached by name."""

from __future__ import annotations

import pytest

from meerkat_runtime import Runtime, RuntimeTurnMetadata
from meerkat_runtime.core.agent import AgentConfig, AgentExecutor
from meerkat_runtime.core.lifecycle import RunFailure
from meerkat_runtime.runtime.outcomes import AbandonedWait, CompletedWait, Deduplicated


async def test_retrying_a_deferred_sessions_first_turn_deduplicates() -> None:
    async with Runtime.open("memory://") as rt:
        s = await rt.create_session(deferred_prompt="context first")
        first = await rt.turn(s.id, "hello", idempotency_key="k1")
        out = await first.wait(5)
        assert isinstance(out, CompletedWait)
        assert "context first\n\nhello" in out.result.text
        again = await rt.turn(s.id, "hello", idempotency_key="k1")
        assert isinstance(again.outcome, Deduplicated)
        assert again.outcome.existing_id == first.input_id
        # a new key is a new turn, without the deferred prompt
        other = await (await rt.turn(s.id, "bye", idempotency_key="k2")).wait(5)
        assert isinstance(other, CompletedWait)
        assert "context first" not in other.result.text


async def test_a_provider_override_is_not_served_by_a_model_cached_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("OPENAI_API_KEY", "RKAT_OPENAI_API_KEY", "OPENAI_BASE_URL", "RKAT_OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    async with Runtime.open("memory://") as rt:
        s = await rt.create_session(model="offline")
        ok = await (await rt.turn(s.id, "one")).wait(5)
        assert isinstance(ok, CompletedWait)
        # the same model name with provider "openai": an OpenAI model is built (and fails for
        # want of a key) instead of the cached offline one answering
        meta = RuntimeTurnMetadata(provider="openai")
        out = await (await rt.turn(s.id, "two", turn_metadata=meta)).wait(5)
        assert isinstance(out, AbandonedWait)
        assert out.error is not None and "authentication" in out.error


def test_agent_resolves_models_by_name_and_provider() -> None:
    agent = AgentExecutor(AgentConfig(model="offline"))
    offline = agent._resolve(agent._settings(None))
    assert type(offline).__name__ == "OfflineModel"
    meta = RuntimeTurnMetadata(provider="openai")
    other = agent._resolve(agent._settings(meta))
    assert type(other).__name__ == "OpenAIModel"
    assert agent._resolve(agent._settings(None)) is offline
    with pytest.raises(RunFailure):
        agent._resolve(agent._settings(RuntimeTurnMetadata(provider="nope")))
