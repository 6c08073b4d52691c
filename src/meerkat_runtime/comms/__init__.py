"""Peer comms between sessions sharing a store (see ``service.py`` and ``docs/comms.md``)."""

from .service import (
    COMMS_NAME_PATTERN,
    PROGRESS_STATUSES,
    SENDABLE_KINDS,
    TERMINAL_STATUSES,
    CommsService,
    comms_name_of,
    validate_comms_name,
)
from .tools import COMMS_TOOL_NAMES, comms_tools

__all__ = [
    "COMMS_NAME_PATTERN",
    "COMMS_TOOL_NAMES",
    "PROGRESS_STATUSES",
    "SENDABLE_KINDS",
    "TERMINAL_STATUSES",
    "CommsService",
    "comms_name_of",
    "comms_tools",
    "validate_comms_name",
]
