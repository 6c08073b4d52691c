"""Webhooks: ``POST /webhooks/{session_id}/{event_type}`` turns a signed HTTP delivery into a
durable ``external_event`` input of the session (docs/webhooks.md).

Invariants:
- A delivery is authenticated by its signature alone (never by the bearer token): header
  ``X-Meerkat-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body bytes with the
  session's secret, compared in constant time. The per-session secret (``webhook_secrets``)
  wins over the server-wide one (``MEERKAT_WEBHOOK_SECRET``); a session without either has
  webhooks disabled (403).
- Nothing is read, parsed or touched before the signature is verified: a request without a
  secret, without a signature or with a wrong one leaves no trace (no input, no event, no
  store write). Only then are the event type, the delivery id and the payload checked (400)
  and the session looked up (404).
- The delivery id (``X-Meerkat-Delivery``) becomes the input's idempotency key
  (``webhook:<id>``, S11): a redelivery of the same event type and body is ``deduplicated``
  onto the first input; the same id with another event type or body is 409.
- The runtime's policy table decides what happens to the event (S1); when the row for
  ``(external_event, event_type)`` has queue mode ``supersede`` the input carries the event
  type as its supersession key, so the latest delivery of each type wins (S2) and event
  types never supersede each other. ``coalesce`` rows are merged by the runtime (S3).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..host import Runtime
from ..runtime.inputs import ExternalEventInput
from ..runtime.outcomes import Deduplicated, RejectCode, Rejected
from ..runtime.policy import QueueMode
from .common import SurfaceError, reject_error

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_TYPE_PATTERN",
    "IDEMPOTENCY_PREFIX",
    "SIGNATURE_HEADER",
    "SOURCE_NAME",
    "WEBHOOK_PATH",
    "WEBHOOK_SECRET_ENV",
    "SecretSource",
    "WebhookSecrets",
    "accept_delivery",
    "parse_payload",
    "signature",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Meerkat-Signature"
DELIVERY_HEADER = "X-Meerkat-Delivery"
WEBHOOK_SECRET_ENV = "MEERKAT_WEBHOOK_SECRET"
SOURCE_NAME = "webhook"
"""The ``source_name`` of the inputs' ``external`` origin."""
IDEMPOTENCY_PREFIX = "webhook:"
"""Prefix of the idempotency key made from a delivery id (keeps it apart from other keys)."""
WEBHOOK_PATH = re.compile(r"/webhooks/[^/]+/[^/]+")
"""The webhook route's paths (exempt from the bearer token)."""
EVENT_TYPE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DELIVERY_PATTERN = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, no spaces
_JSON_TYPES = ("application/json",)

SecretSource: TypeAlias = Mapping[str, str] | Callable[[str], str | None]
"""Per-session secrets: a mapping from session id, or a function of the session id."""


@dataclass(frozen=True, slots=True)
class WebhookSecrets:
    """Where a session's webhook secret comes from: ``per_session`` first, then ``default``."""

    per_session: SecretSource | None = None
    default: str | None = None

    def for_session(self, session_id: str) -> str | None:
        secret: str | None = None
        if isinstance(self.per_session, Mapping):
            secret = self.per_session.get(session_id)
        elif self.per_session is not None:
            secret = self.per_session(session_id)
        return secret or self.default or None


def signature(secret: str | bytes, body: bytes) -> str:
    """The ``X-Meerkat-Signature`` value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time; hex in any case)."""
    if not header:
        return False
    expected = signature(secret, body).encode()
    scheme, sep, digest = header.strip().partition("=")
    if not sep or scheme.lower() != "sha256":
        return False
    # bytes, not str: compare_digest refuses non-ASCII strings (a header can be any latin-1)
    given = ("sha256=" + digest.lower()).encode("latin-1", errors="replace")
    return hmac.compare_digest(given, expected)


def _unauthorized(header: str | None) -> SurfaceError:
    if not header:
        problem = f"the {SIGNATURE_HEADER} header is missing"
    elif not header.strip().lower().startswith("sha256="):
        problem = f"the {SIGNATURE_HEADER} header is not of the form sha256=<hex>"
    else:
        problem = "the signature does not match the body"
    return SurfaceError(
        "unauthorized",
        f"webhook signature check failed: {problem}; send {SIGNATURE_HEADER}: sha256=<hex "
        "HMAC-SHA256 of the exact request body, keyed with the webhook secret>",
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_payload(body: bytes, content_type: str | None) -> Any:
    """The event's payload: the JSON value of a JSON body (no Content-Type counts as JSON; an
    empty body is ``null``), or the text of any other body. Raises ``SurfaceError``."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    if not media or media in _JSON_TYPES or media.endswith("+json"):
        if not body.strip():
            return None
        try:
            return json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise SurfaceError(
                "bad_request",
                f"body: not valid JSON ({exc}); send JSON with Content-Type: application/json, "
                "or text with Content-Type: text/plain",
                field="body",
            ) from None
    charset = "utf-8"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        return body.decode(charset)
    except (LookupError, UnicodeDecodeError) as exc:
        raise SurfaceError(
            "bad_request",
            f"body: a {media} body must be text in its charset ({charset}): {exc}",
            field="body",
        ) from None


def _check_event_type(event_type: str) -> str:
    if EVENT_TYPE_PATTERN.fullmatch(event_type) is None:
        raise SurfaceError(
            "bad_request",
            f"event_type: expected 1-128 characters of letters, digits and . _ : - (starting "
            f"with a letter or digit), got {event_type[:140]!r}",
            field="event_type",
        )
    return event_type


def _check_delivery(delivery: str | None) -> str | None:
    if delivery is None:
        return None
    if _DELIVERY_PATTERN.fullmatch(delivery) is None:
        raise SurfaceError(
            "bad_request",
            f"{DELIVERY_HEADER}: expected 1-200 visible ASCII characters (no spaces), got "
            f"{delivery[:210]!r}",
            field=DELIVERY_HEADER,
        )
    return delivery


def supersession_key(rt: Runtime, event_type: str) -> str | None:
    """The event type when the policy row for ``(external_event, event_type)`` supersedes
    (idle or running), else ``None`` (the table is the runtime's, S1)."""
    for idle in (True, False):
        decision = rt.policy.resolve("external_event", idle, event_type)
        if decision.queue_mode is QueueMode.SUPERSEDE:
            return event_type
    return None


async def accept_delivery(
    rt: Runtime,
    secrets: WebhookSecrets,
    session_id: str,
    event_type: str,
    body: bytes,
    *,
    signature_header: str | None,
    delivery: str | None,
    content_type: str | None,
) -> tuple[int, dict[str, Any]]:
    """Check and accept one delivery: the HTTP status and answer body, or ``SurfaceError``.

    ``rt`` is called for nothing before the signature is verified."""
    secret = secrets.for_session(session_id)
    if secret is None:
        raise SurfaceError(
            "forbidden",
            "webhooks are not enabled for this session: set MEERKAT_WEBHOOK_SECRET (or "
            "serve(webhook_secret=...)) for every session, or give this session a secret "
            "with create_app(webhook_secrets=...)",
        )
    if not verify_signature(secret, body, signature_header):
        raise _unauthorized(signature_header)
    # authenticated from here on
    event_type = _check_event_type(event_type)
    delivery = _check_delivery(delivery)
    payload = parse_payload(body, content_type)
    info = await rt.get_session(session_id)  # unknown session: 404
    if info.archived:
        raise SurfaceError("conflict", f"session {session_id} is archived; it takes no input")
    inp = ExternalEventInput.new(
        event_type,
        payload,
        source_name=SOURCE_NAME,
        idempotency_key=IDEMPOTENCY_PREFIX + delivery if delivery else None,
        supersession_key=supersession_key(rt, event_type),
    )
    outcome = await rt.accept(session_id, inp)
    base: dict[str, Any] = {"session_id": session_id, "event_type": event_type}
    if delivery is not None:
        base["delivery_id"] = delivery
    if isinstance(outcome, Rejected):
        if outcome.code is RejectCode.IDEMPOTENCY_CONFLICT:
            raise SurfaceError(
                "conflict",
                f"delivery {delivery!r} was already received with another event type or body; "
                f"a redelivery must be identical (a new event needs a new delivery id): "
                f"{outcome.reason}",
                reject_code=outcome.code.value,
                **base,
            )
        err = reject_error(outcome.code.value, outcome.reason)
        err.details.update(base)
        raise err
    if isinstance(outcome, Deduplicated):
        existing = str(outcome.existing_id)
        return 200, {
            **base,
            "input_id": existing,
            "outcome_type": "deduplicated",
            "existing_id": existing,
        }
    return 202, {**base, "input_id": str(outcome.input_id), "outcome_type": "accepted"}
