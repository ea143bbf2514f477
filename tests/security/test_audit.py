"""The audit log: JSON lines with time, principal, action, target, result, client; no secrets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec

from modelyard.core.audit import AuditLog, redact


def test_events_are_json_lines_with_every_field(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit" / "log.jsonl", clock=lambda: 1_800_000_000.25)
    log.record("model.swap", result="ok", principal="key:0123456789abcdef",
               target="POST /admin/models/echo/swap", client="10.1.2.3", status=200)
    log.record(
        "auth.failure", result="denied", client="10.1.2.4", status=401, detail="token expired"
    )
    lines = (tmp_path / "audit" / "log.jsonl").read_bytes().splitlines()
    first, second = (msgspec.json.decode(line) for line in lines)
    assert first == {
        "time": "2027-01-15T08:00:00.250Z", "principal": "key:0123456789abcdef",
        "action": "model.swap", "target": "POST /admin/models/echo/swap", "result": "ok",
        "client": "10.1.2.3", "status": 200, "detail": "",
    }
    assert second["action"] == "auth.failure" and second["detail"] == "token expired"
    assert stat.S_IMODE(os.stat(tmp_path / "audit" / "log.jsonl").st_mode) == 0o600
    assert [e.action for e in log.read()] == ["model.swap", "auth.failure"]


def test_nothing_shaped_like_a_secret_is_written(tmp_path: Path) -> None:
    key = "my_0123456789abcdef_" + "A" * 43
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    log = AuditLog(tmp_path / "a.jsonl")
    log.record("auth.failure", result="denied", target=f"GET /x?k={key}", detail=f"bad {token}")
    text = (tmp_path / "a.jsonl").read_text()
    assert key not in text and "A" * 20 not in text and token not in text
    assert "my_0123456789abcdef_<redacted>" in text and "<jwt>" in text


def test_redact_leaves_ordinary_text_alone() -> None:
    assert redact("not allowed to use model 'my_model'") == "not allowed to use model 'my_model'"


def test_without_a_path_events_go_to_the_logger_only(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="modelyard.audit")
    event = AuditLog(None).record("key.create", result="ok", target="key:ab")
    assert event.action == "key.create"
    assert '"action":"key.create"' in caplog.text
