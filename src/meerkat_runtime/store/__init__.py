"""Stores behind one protocol (``base.RuntimeStore``): memory, SQLite and PostgreSQL.

``open_store(url)`` picks the implementation from a URL and returns it *not yet opened*
(``await store.open()`` creates or migrates the schema). Accepted forms:

- ``None``: SQLite at ``default_state_path()``;
- ``memory://``: the in-memory store (tests, throwaway runs);
- ``sqlite:///relative/path.db`` (three slashes: relative to the working directory) and
  ``sqlite:////absolute/path.db`` (four slashes), the SQLAlchemy convention;
- a bare filesystem path ending in ``.db``, ``.sqlite`` or ``.sqlite3``;
- ``postgresql://user:password@host:5432/dbname`` (also ``postgres://`` and the SQLAlchemy
  style ``postgresql+psycopg://``): the PostgreSQL store, any libpq URL (query parameters such
  as ``sslmode=require`` or ``options=-csearch_path%3Dmyschema`` pass through).

The implementations are imported lazily so that importing ``meerkat_runtime.store.base`` (as
the runtime does) never drags in the stores, and no import cycle can form.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .base import StoreError

if TYPE_CHECKING:
    from .base import RuntimeStore

__all__ = ["default_state_path", "open_store", "redact_url", "scrub"]

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

_ACCEPTED_FORMS = (
    "memory://, sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "a file path ending in .db, .sqlite or .sqlite3, postgresql://user@host/dbname, "
    "or nothing for the default database"
)


def default_state_path() -> Path:
    """``$MEERKAT_STATE_DIR/meerkat.db``, else ``~/.local/share/meerkat/meerkat.db``.

    Nothing is created here; the SQLite store creates the directory when it is opened.
    """
    state_dir = os.environ.get("MEERKAT_STATE_DIR")
    if state_dir:
        return Path(state_dir).expanduser() / "meerkat.db"
    return Path.home() / ".local" / "share" / "meerkat" / "meerkat.db"


def open_store(url: str | None) -> RuntimeStore:
    """The store for ``url`` (see the module docstring for the accepted forms), not opened.

    Raises ``StoreError`` for a URL it cannot serve, saying which forms it accepts.
    """
    from .memory import MemoryStore
    from .sqlite import SqliteStore

    if url is None:
        return SqliteStore(default_state_path())
    text = url.strip()
    if not text:
        raise StoreError(f"store URL is empty; use one of: {_ACCEPTED_FORMS}")
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "memory":
            return MemoryStore(text)
        if scheme == "sqlite":
            return SqliteStore(_sqlite_path(text, rest), url=text)
        if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
            from .postgres import PostgresStore  # psycopg is imported only when asked for

            return PostgresStore(text)
        raise StoreError(
            f"store URL {redact_url(url)!r}: unknown scheme {scheme!r}; use one of: "
            f"{_ACCEPTED_FORMS}"
        )
    if text.lower().endswith(_SQLITE_SUFFIXES):
        return SqliteStore(Path(text).expanduser())
    raise StoreError(
        f"store URL {scrub(url, url)!r} is not understood; use one of: {_ACCEPTED_FORMS}"
    )


_USERINFO_PASSWORD = re.compile(r"^[A-Za-z][\w+.-]*:/*[^:/@?#]*:([^@/?#]*)@")
_QUERY_PASSWORD = re.compile(r"(?i)[?&]password=([^&#\s]*)")


def _passwords(url: str | None) -> list[str]:
    """The password(s) in ``url`` as written and percent-decoded, longest first."""
    if not url:
        return []
    found: set[str] = set()
    for m in (_USERINFO_PASSWORD.match(url.strip()), *_QUERY_PASSWORD.finditer(url)):
        if m is not None and m.group(1):
            found.update({m.group(1), unquote(m.group(1))})
    found.discard("")
    return sorted(found, key=len, reverse=True)


def scrub(message: str, url: str | None) -> str:
    """``message`` with every URL in it redacted and every occurrence of ``url``'s password
    replaced by ``***``: drivers' messages may quote parts of the URL (a malformed
    percent-escape, a bad host), so no store message ever shows a password."""
    text = redact_url(message)
    for secret in _passwords(url):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """``url`` with a password in it replaced by ``***`` (for messages and listings)."""
    out = re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", out)


def _sqlite_path(url: str, rest: str) -> Path:
    """``rest`` is what follows ``sqlite://``: ``/relative.db`` or ``//absolute.db``."""
    if not rest.startswith("/"):
        raise StoreError(
            f"store URL {url!r}: a SQLite URL has no host; write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = rest[1:]
    if not path:
        raise StoreError(
            f"store URL {url!r} names no file; write sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    if path == ":memory:":
        raise StoreError(
            f"store URL {url!r}: an in-memory SQLite database cannot be shared between the "
            "store's threads; use memory:// instead"
        )
    return Path(path).expanduser()
