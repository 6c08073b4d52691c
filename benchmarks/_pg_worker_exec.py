"""Executors for ``bench_postgres.py``, in-process and in ``meerkat worker`` processes
(``meerkat worker --executor-factory _pg_worker_exec:factory``, with this directory on
``PYTHONPATH``).

``NoopExecutor`` (from ``_common``) commits its boundary with the staged user messages and returns
``RunResult(text="ok")`` (the executor of ``bench_durable.py``), after an optional
``asyncio.sleep`` (``MEERKAT_BENCH_RUN_SECONDS`` in a worker's environment: a run that waits
like an LLM call, for the failover measurement's in-flight load). Sessions created without an
executor of their own (``custom_executor`` false) get ``None``: the built-in agent.
"""

from __future__ import annotations

import os

from _common import NoopExecutor

from meerkat_runtime.store.base import SessionRecord

RUN_SECONDS_ENV = "MEERKAT_BENCH_RUN_SECONDS"


def factory(record: SessionRecord) -> NoopExecutor | None:
    """``--executor-factory``: the no-op executor for sessions created with one, the built-in
    agent (``None``) for the others."""
    if not record.config.get("custom_executor"):
        return None
    return NoopExecutor(float(os.environ.get(RUN_SECONDS_ENV, "0") or 0))
