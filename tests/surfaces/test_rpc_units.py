"""In-process pieces of ``rkat-rpc``: line splitting, id recovery, error objects, the config
document (merge patch, validation, generations, persistence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meerkat_runtime.surfaces._rpc_protocol import (
    LineSplitter,
    Oversized,
    RpcError,
    error_object,
    guess_id,
)
from meerkat_runtime.surfaces.common import SurfaceError
from meerkat_runtime.surfaces.config import ConfigDocument, merge_patch


def test_lines_split_across_chunks_and_oversized_lines_are_skipped() -> None:
    s = LineSplitter(max_line=10)
    assert s.feed(b'{"a"') == []
    assert s.feed(b":1}\n{}\n{") == [b'{"a":1}', b"{}"]
    out = s.feed(b'"id":7,"x":"' + b"y" * 30)  # the pending line grows past the limit
    assert out == []
    out = s.feed(b'"}\nok\n')
    assert len(out) == 2 and isinstance(out[0], Oversized) and out[1] == b"ok"
    assert out[0].size > 10 and guess_id(out[0].prefix) == 7
    assert s.feed(b"tail") == [] and s.finish() == [b"tail"]
    assert s.finish() == []


def test_guess_id_and_error_objects() -> None:
    assert guess_id(b'{"jsonrpc":"2.0","id":"abc","method":"x"') == "abc"
    assert guess_id(b'{"method":"x","params":{"prompt":"') is None
    err = error_object(SurfaceError("not_found", "no session 'x'", session_id="x"))
    assert err == {
        "code": -32001,
        "message": "no session 'x'",
        "data": {"code": "not_found", "session_id": "x"},
    }
    assert error_object(SurfaceError("budget_exhausted", "b"))["code"] == -32011
    assert error_object(SurfaceError("provider_error", "p"))["code"] == -32010
    assert error_object(SurfaceError("conflict", "c"))["code"] == -32002
    assert error_object(SurfaceError("unsupported", "u"))["code"] == -32602
    assert error_object(RpcError(-32700, "parse_error", "bad"))["data"] == {"code": "parse_error"}


def test_merge_patch_follows_rfc_7396() -> None:
    base = {"a": 1, "b": {"c": 2, "d": 3}}
    assert merge_patch(base, {"a": None, "b": {"c": None, "e": 4}, "f": [1]}) == {
        "b": {"d": 3, "e": 4},
        "f": [1],
    }
    assert base == {"a": 1, "b": {"c": 2, "d": 3}}  # unchanged


def test_config_document_validates_versions_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "rpc-config.json"
    doc = ConfigDocument.load(path)
    assert doc.envelope()["config"] == {"model": "offline"} and doc.generation == 0
    doc.set({"system_prompt": "hi", "max_tokens": 10})
    assert doc.values == {"model": "offline", "system_prompt": "hi", "max_tokens": 10}
    doc.patch({"max_tokens": None}, expected_generation=1)
    assert doc.values == {"model": "offline", "system_prompt": "hi"} and doc.generation == 2
    for bad in ({"max_tokens": 0}, {"max_tokens": True}, {"nope": 1}, {"provider": "acme"}):
        with pytest.raises(SurfaceError) as err:
            doc.patch(bad)
        assert err.value.code == "bad_request"
    with pytest.raises(SurfaceError) as err:
        doc.set({}, expected_generation=5)
    assert err.value.code == "conflict"
    assert doc.generation == 2
    assert json.loads(path.read_text())["generation"] == 2
    again = ConfigDocument.load(path)
    assert again.values == doc.values and again.generation == 2
    path.write_text('{"config": {"max_tokens": "x"}}')
    with pytest.raises(ValueError, match=r"rpc-config\.json is invalid"):
        ConfigDocument.load(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="cannot be read"):
        ConfigDocument.load(path)
