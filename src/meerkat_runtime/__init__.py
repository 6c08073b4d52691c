"""meerkat-runtime: a runtime control plane for long-lived LLM agent sessions.

The public surface: ``Runtime`` (host.py), the input constructors, the executor contract
(``CoreExecutor``, ``RunContext``, ``RunResult``, ``Message``), outcomes and errors.
"""

from .core.lifecycle import (
    CoreExecutor,
    Message,
    RunCancelled,
    RunContext,
    RunFailure,
    RunFenced,
    RunResult,
    RuntimeTurnMetadata,
)
from .errors import (
    InputNotFoundError,
    InputRejectedError,
    InvalidOperationError,
    MeerkatRuntimeError,
    SessionNotFoundError,
)
from .host import CompletionHandle, Runtime, SessionInfo
from .runtime.driver import Rebuilders, RuntimeConfig
from .runtime.input_state import InputLifecycleState, InputState
from .runtime.inputs import (
    ExternalEventInput,
    FlowStepInput,
    Input,
    PeerInput,
    ProjectedInput,
    PromptInput,
    SystemGeneratedInput,
)
from .runtime.outcomes import AcceptOutcome, RejectCode, WaitOutcome
from .runtime.policy import PolicyRow, PolicyTable, default_policy_table
from .runtime.state import RuntimeState

__version__ = "0.1.0"

__all__ = [
    "AcceptOutcome",
    "CompletionHandle",
    "CoreExecutor",
    "ExternalEventInput",
    "FlowStepInput",
    "Input",
    "InputLifecycleState",
    "InputNotFoundError",
    "InputRejectedError",
    "InputState",
    "InvalidOperationError",
    "MeerkatRuntimeError",
    "Message",
    "PeerInput",
    "PolicyRow",
    "PolicyTable",
    "ProjectedInput",
    "PromptInput",
    "Rebuilders",
    "RejectCode",
    "RunCancelled",
    "RunContext",
    "RunFailure",
    "RunFenced",
    "RunResult",
    "Runtime",
    "RuntimeConfig",
    "RuntimeState",
    "RuntimeTurnMetadata",
    "SessionInfo",
    "SessionNotFoundError",
    "SystemGeneratedInput",
    "WaitOutcome",
    "default_policy_table",
]
