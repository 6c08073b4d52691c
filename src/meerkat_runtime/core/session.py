"""Conversations: append-only rows with a chained digest (spec §3).

Invariants:
- Rows are only ever appended; a commit writes only the new rows.
- Row ``n`` carries ``d_n = SHA-256(d_{n-1} ‖ canonical JSON of message n)`` with
  ``d_{-1}`` = 32 zero bytes, so the last digest commits to the whole history in order.
- Every row records the run that appended it and the inputs it renders (``input_ids``), so a
  duplicate application of an input is visible as two rows naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .._ids import InputId, RunId
from .._json import canonical_bytes
from .lifecycle import Message

__all__ = ["GENESIS_DIGEST", "Conversation", "ConversationRow"]

GENESIS_DIGEST = bytes(32)


@dataclass(frozen=True, slots=True)
class ConversationRow:
    index: int
    run_id: RunId | None
    input_ids: tuple[InputId, ...]
    message: Message
    digest: bytes


@dataclass(slots=True)
class Conversation:
    rows: list[ConversationRow] = field(default_factory=list)

    @property
    def digest(self) -> bytes:
        return self.rows[-1].digest if self.rows else GENESIS_DIGEST

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self) -> list[Message]:
        return [r.message for r in self.rows]

    def make_rows(self, messages: list[Message], run_id: RunId | None) -> list[ConversationRow]:
        """Rows for ``messages`` chained onto this conversation (not yet appended)."""
        out: list[ConversationRow] = []
        prev = self.digest
        index = len(self.rows)
        for m in messages:
            prev = hashlib.sha256(prev + canonical_bytes(m.to_json_dict())).digest()
            out.append(ConversationRow(index, run_id, tuple(m.input_ids), m, prev))
            index += 1
        return out

    def extend(self, rows: list[ConversationRow]) -> None:
        self.rows.extend(rows)
