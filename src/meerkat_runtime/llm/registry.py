"""Which provider serves a model name, and building that provider.

Rules (first match wins): an explicit ``provider``; the name ``offline``; names starting with
``claude`` → ``anthropic``; names starting with ``gpt``, ``o1``, ``o3``, ``o4``, ``chatgpt``,
``text-`` or ``ft:`` → ``openai``; any other name → ``openai`` when an OpenAI-compatible base
URL is configured (``OPENAI_BASE_URL`` / ``RKAT_OPENAI_BASE_URL``: vLLM, llama.cpp, Ollama
serve arbitrary model names); otherwise an ``UnknownModelError`` that says how to choose.

Building a provider does no I/O and reads no key: keys are read from the environment at the
first call (a missing key is an ``AuthenticationError`` then), so sessions can be created and
recovered without them. The SDK modules are imported only when their provider is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .base import Model
from .offline import OfflineModel

__all__ = ["PROVIDERS", "Provider", "UnknownModelError", "build_model", "infer_provider"]

Provider = Literal["offline", "openai", "anthropic"]
PROVIDERS: tuple[Provider, ...] = ("offline", "openai", "anthropic")

_OPENAI_PREFIXES = ("gpt", "o1", "o3", "o4", "chatgpt", "text-", "ft:")


class UnknownModelError(ValueError):
    """No provider could be chosen for a model name, or the provider name is unknown."""


def infer_provider(model: str, provider: str | None = None) -> Provider:
    if provider is not None:
        p = provider.strip().lower()
        if p == "openai_compatible":
            p = "openai"
        if p not in PROVIDERS:
            raise UnknownModelError(
                f"unknown provider {provider!r}; accepted: {', '.join(PROVIDERS)}"
            )
        return p
    name = model.strip().lower()
    if name == "offline" or name.startswith("offline:"):
        return "offline"
    if name.startswith("claude"):
        return "anthropic"
    if name.startswith(_OPENAI_PREFIXES):
        return "openai"
    if os.environ.get("OPENAI_BASE_URL") or os.environ.get("RKAT_OPENAI_BASE_URL"):
        return "openai"
    raise UnknownModelError(
        f"cannot tell which provider serves model {model!r}: give the provider "
        f"({', '.join(PROVIDERS)}), or set OPENAI_BASE_URL for an OpenAI-compatible server"
    )


def build_model(
    model: str,
    provider: str | None = None,
    *,
    offline_script: Sequence[Mapping[str, Any]] | None = None,
    base_url: str | None = None,
) -> Model:
    """The provider object for ``model`` (see the module docstring for the rules)."""
    chosen = infer_provider(model, provider)
    if chosen == "offline":
        return OfflineModel(offline_script, name=model)
    if chosen == "anthropic":
        from .anthropic import AnthropicModel

        return AnthropicModel(model, base_url=base_url)
    from .openai import OpenAIModel

    return OpenAIModel(model, base_url=base_url)
