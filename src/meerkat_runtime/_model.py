"""The base class of every wire model.

Serialisation rules of the reference (reference-inputs.md §1.3): tag first (declare it first),
fields in declared order, unset optional fields omitted (never ``null``), unknown fields ignored
on read. Models that must write an explicit ``null`` or omit an empty list say so by overriding
``_keep_none`` / ``_omit_empty``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, model_serializer
from pydantic_core.core_schema import SerializerFunctionWrapHandler

__all__ = ["WireModel"]


class WireModel(BaseModel):
    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, frozen=False, serialize_by_alias=True
    )

    _keep_none: ClassVar[frozenset[str]] = frozenset()
    _omit_empty: ClassVar[frozenset[str]] = frozenset()
    _tag: ClassVar[str | None] = None

    @model_serializer(mode="wrap")
    def _serialise(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        keep = self._keep_none
        omit = self._omit_empty
        out: dict[str, Any] = {}
        tag = self._tag
        if tag is not None and tag in data:
            out[tag] = data[tag]
        for k, v in data.items():
            if (v is not None or k in keep) and not (k in omit and v == []):
                out[k] = v
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON document as a dict (JSON-compatible values only)."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Self:
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)
