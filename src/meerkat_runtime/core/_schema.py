"""Structured output: validating a final answer against a JSON Schema.

Invariants: a schema is checked once, at construction (``ValueError`` naming the problem), so
a run never starts with a schema that cannot be used; ``parse`` never raises: it returns the
parsed value and an empty list, or ``None`` and the problems found (each ``path: message``).
A fenced code block (```json ... ```) around the answer is accepted, since models add one.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

__all__ = ["SchemaValidator"]

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)
_MAX_ERRORS = 5


class SchemaValidator:
    def __init__(self, schema: dict[str, Any]) -> None:
        if not isinstance(schema, dict):
            raise ValueError(f"output_schema must be a JSON object, got {type(schema).__name__}")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"output_schema is not a valid JSON Schema: {exc.message}") from None
        self.schema = schema
        self._validator = cls(schema)

    def parse(self, text: str) -> tuple[Any, list[str]]:
        match = _FENCE.match(text)
        body = match.group(1) if match else text
        try:
            value = json.loads(body)
        except ValueError as exc:
            return None, [f"the answer is not JSON ({exc})"]
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if not errors:
            return value, []
        out = []
        for err in errors[:_MAX_ERRORS]:
            path = "/".join(str(p) for p in err.path) or "(root)"
            out.append(f"{path}: {err.message}")
        return None, out

    def correction(self, errors: list[str]) -> str:
        """The notice that asks the model for a corrected answer."""
        return (
            "Your final answer must be only a JSON value that matches this JSON Schema: "
            f"{json.dumps(self.schema, separators=(',', ':'))}. Problems with the last answer: "
            + "; ".join(errors)
        )
