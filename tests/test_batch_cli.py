"""``modelyard batch run``: an OpenAI Batch file run offline, answers as the live endpoints'."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from modelyard.api.app import create_app, load_plugins
from modelyard.cli import cli
from modelyard.core.service import InferenceService
from modelyard.core.settings import load_settings

EXAMPLE = Path(__file__).parents[1] / "examples" / "echo.toml"

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"

#: custom_id -> (endpoint, body); "wrong-task" asks the embeddings model to chat (a 400).
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat-1": (CHAT, {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}),
    "chat-2": (CHAT, {"model": "echo", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "one two three four"}]}),
    "wrong-task": (CHAT, {"model": "echo-embed",
                          "messages": [{"role": "user", "content": "hi"}]}),
}
EMBEDS: dict[str, tuple[str, dict[str, Any]]] = {
    "embed-1": (EMBED, {"model": "echo-embed", "input": "a sentence"}),
    "embed-2": (EMBED, {"model": "echo-embed", "input": ["two", "inputs"]}),
}

#: Fields that differ between any two answers to the same request (a live problem body's
#: ``request_id`` is the batch record's ``response.request_id``, as in ``/v1/batches``).
VOLATILE = ("id", "created", "request_id")


def _write_input(path: Path, requests: dict[str, tuple[str, dict[str, Any]]]) -> Path:
    path.write_text("".join(
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"
        for cid, (url, body) in requests.items()))
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE}


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["batch", "run", *args, "--config", str(EXAMPLE),
                                    "--no-progress"])


def _live(requests: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, tuple[int, Any]]:
    """What the live endpoints answer each request, on a server of the same config."""

    async def ask() -> dict[str, tuple[int, Any]]:
        settings = load_settings(EXAMPLE)
        host = load_plugins(settings)
        service = InferenceService(settings, host)
        app = create_app(settings, plugins=host, service=service)
        await service.start()
        try:
            await service.wait_until_loaded()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers = {}
                for cid, (url, body) in requests.items():
                    response = await client.post(url, json=body)
                    answers[cid] = (response.status_code, response.json())
                return answers
        finally:
            await service.stop()

    return asyncio.run(ask())


def test_chat_lines_answer_as_the_live_endpoint_and_failures_go_to_errors(
    tmp_path: Path,
) -> None:
    source = _write_input(tmp_path / "in.jsonl", REQUESTS)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = _run(str(source), "--out", str(out), "--errors", str(errors))
    assert result.exit_code == 2, result.output  # the run finished; one line failed
    assert "3 lines: 2 ok, 1 failed" in result.output
    done, failed = _read(out), _read(errors)
    assert [r["custom_id"] for r in done] == ["chat-1", "chat-2"]  # input order
    assert [r["custom_id"] for r in failed] == ["wrong-task"]
    live = _live(REQUESTS)
    for record in done + failed:
        status, body = live[record["custom_id"]]
        assert record["response"]["status_code"] == status
        assert _stable(record["response"]["body"]) == _stable(body)
        assert record["id"].startswith("batch_req_") and record["error"] is None
    assert failed[0]["response"]["body"]["status"] == 400


def test_embedding_lines_answer_as_the_live_endpoint_and_exit_0(tmp_path: Path) -> None:
    source = _write_input(tmp_path / "in.jsonl", EMBEDS)
    out = tmp_path / "out.jsonl"
    result = _run(str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    done = _read(out)
    assert [r["custom_id"] for r in done] == ["embed-1", "embed-2"]
    live = _live(EMBEDS)
    for record in done:
        status, body = live[record["custom_id"]]
        assert (record["response"]["status_code"], status) == (200, 200)
        assert _stable(record["response"]["body"]) == _stable(body)


def test_without_errors_file_failed_lines_stay_in_output_in_order(tmp_path: Path) -> None:
    source = _write_input(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    result = _run(str(source), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert [r["custom_id"] for r in _read(out)] == ["chat-1", "chat-2", "wrong-task"]


def test_a_bad_input_line_is_refused_by_number_and_nothing_runs(tmp_path: Path) -> None:
    source = _write_input(tmp_path / "in.jsonl", REQUESTS)
    source.write_text(source.read_text() + "not json\n")
    out = tmp_path / "out.jsonl"
    result = _run(str(source), "--out", str(out))
    assert result.exit_code == 1
    assert "line 4" in result.output and "not a JSON request object" in result.output
    assert not out.exists()


def test_duplicate_ids_unknown_models_and_mixed_urls_are_refused(tmp_path: Path) -> None:
    cases = {
        "duplicate custom_id 'chat-1'": [("chat-1", REQUESTS["chat-1"])] * 2,
        "unknown model 'nope'": [("x", (CHAT, {"model": "nope", "messages": []}))],
        "is not the batch's endpoint": [("a", REQUESTS["chat-1"]), ("b", EMBEDS["embed-1"])],
        "is not one of": [("a", ("/v1/images", {"model": "echo"}))],
    }
    for message, lines in cases.items():
        source = tmp_path / "in.jsonl"
        source.write_text("".join(
            json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"
            for cid, (url, body) in lines))
        result = _run(str(source), "--out", str(tmp_path / "out.jsonl"))
        assert result.exit_code == 1, (message, result.output)
        assert message in result.output, result.output
        assert "line " in result.output
