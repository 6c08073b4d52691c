"""The server's config document: defaults for the sessions a surface creates.

The document is a flat JSON object with these keys (all optional except ``model``, which
defaults to ``"offline"``):

========================== ==================================================================
``model``                  model of new sessions (``offline``, ``gpt-...``, ``claude-...``)
``provider``               provider of new sessions that name no model (``offline``,
                           ``openai``, ``anthropic``)
``system_prompt``          system prompt of new sessions
``max_tokens``             per-call output cap of new sessions
``max_turns``              model calls per run of new sessions
``structured_output_retries`` default retries for structured output
``provider_params``        extra provider parameters of new sessions
``offline_script``         the offline model's script for new offline sessions
========================== ==================================================================

A request's own values always win over the document's. ``provider`` applies only when the
request names neither a model nor a provider (a request that names a model gets that model's
provider).

Invariants:
- The document is always valid: ``set`` and ``patch`` validate the result (types, and the
  agent settings it describes, by building them) and change nothing when it is not; errors
  are ``SurfaceError("bad_request")`` naming the key.
- ``generation`` starts at 0 and grows by one with every successful ``set`` / ``patch``; a
  write that passes ``expected_generation`` different from the current one is refused with
  ``SurfaceError("conflict")`` and changes nothing.
- With a ``path`` (file-based stores: ``rpc-config.json`` beside the database) every change
  is written atomically (temp file + rename) before it is acknowledged, and the document is
  loaded from there at start; an unreadable or invalid file is refused at start with a message
  naming the file. Without a path the document lives only in memory for the process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..core.agent import AgentConfig
from .common import SurfaceError

__all__ = ["CONFIG_FILE_NAME", "CONFIG_KEYS", "ConfigDocument", "merge_patch"]

CONFIG_FILE_NAME = "rpc-config.json"

_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "provider": (str,),
    "system_prompt": (str,),
    "max_tokens": (int,),
    "max_turns": (int,),
    "structured_output_retries": (int,),
    "provider_params": (dict,),
    "offline_script": (list,),
}
CONFIG_KEYS: tuple[str, ...] = tuple(_TYPES)
_WHAT = {str: "a string", int: "an integer", dict: "an object", list: "an array"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, ``null`` removes a key, any
    other value replaces. Neither argument changes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _validate(doc: Any) -> dict[str, Any]:
    """The document normalised (``model`` filled in), or ``SurfaceError("bad_request")``."""
    if not isinstance(doc, dict):
        raise SurfaceError(
            "bad_request", f"config: expected a JSON object, got {type(doc).__name__}"
        )
    unknown = sorted(set(doc) - set(_TYPES))
    if unknown:
        raise SurfaceError(
            "bad_request",
            f"config: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(CONFIG_KEYS)}",
            field=unknown[0],
        )
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if value is None:
            continue
        kinds = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise SurfaceError(
                "bad_request",
                f"config.{key}: expected {_WHAT[kinds[0]]}, got {type(value).__name__}",
                field=key,
            )
        out[key] = copy.deepcopy(value)
    out.setdefault("model", "offline")
    try:
        AgentConfig(**out)
    except (ValueError, TypeError) as exc:
        raise SurfaceError("bad_request", f"config: {exc}") from None
    return out


class ConfigDocument:
    """The config document of one server process (see the module docstring)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.generation = 0
        self._doc: dict[str, Any] = {"model": "offline"}

    @classmethod
    def load(cls, path: Path | None) -> ConfigDocument:
        """The document stored at ``path`` (defaults when there is no file yet). Raises
        ``ValueError`` naming the file when it cannot be read or is invalid."""
        config = cls(path)
        if path is None or not path.exists():
            return config
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"config file {path} cannot be read: {exc}") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
            raise ValueError(
                f'config file {path} is not a config document ({{"config": {{...}}, '
                '"generation": n}); fix or delete it'
            )
        try:
            config._doc = _validate(stored["config"])
        except SurfaceError as exc:
            raise ValueError(
                f"config file {path} is invalid: {exc.message}; fix or delete it"
            ) from None
        generation = stored.get("generation", 0)
        config.generation = generation if isinstance(generation, int) else 0
        return config

    @property
    def values(self) -> dict[str, Any]:
        """A copy of the document."""
        return copy.deepcopy(self._doc)

    def get(self, key: str) -> Any:
        return copy.deepcopy(self._doc.get(key))

    def envelope(self) -> dict[str, Any]:
        """What ``config/get|set|patch`` answer: ``{config, generation, persisted}``."""
        out: dict[str, Any] = {
            "config": self.values,
            "generation": self.generation,
            "persisted": self.path is not None,
        }
        if self.path is not None:
            out["path"] = str(self.path)
        return out

    def set(self, doc: Any, expected_generation: int | None = None) -> dict[str, Any]:
        """Replace the document; the new envelope."""
        self._check_generation(expected_generation)
        self._commit(_validate(doc))
        return self.envelope()

    def patch(self, patch: Any, expected_generation: int | None = None) -> dict[str, Any]:
        """Apply an RFC 7396 merge patch; the new envelope."""
        if not isinstance(patch, dict):
            raise SurfaceError(
                "bad_request", f"patch: expected a JSON object, got {type(patch).__name__}"
            )
        self._check_generation(expected_generation)
        self._commit(_validate(merge_patch(self._doc, patch)))
        return self.envelope()

    def _check_generation(self, expected: int | None) -> None:
        if expected is not None and expected != self.generation:
            raise SurfaceError(
                "conflict",
                f"config generation conflict: expected {expected}, current {self.generation}; "
                "read the config again and retry",
                expected_generation=expected,
                current_generation=self.generation,
            )

    def _commit(self, doc: dict[str, Any]) -> None:
        generation = self.generation + 1
        if self.path is not None:
            self._write(doc, generation)
        self._doc = doc
        self.generation = generation

    def _write(self, doc: dict[str, Any], generation: int) -> None:
        assert self.path is not None
        text = json.dumps({"config": doc, "generation": generation}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".rpc-config-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise SurfaceError(
                "internal", f"cannot write the config file {self.path}: {exc}"
            ) from None
