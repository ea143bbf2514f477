"""Embeddings and classification on tiny exported BERTs; the real MiniLM in slow tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.types import ClassificationRequest, EmbeddingRequest, Task

SENTENCES = ["the cat sat on the mat", "a dog ran", "hello world", "one two three four five"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}  # the tiny classifier's id2label
Reference = Callable[[Path, list[str], int], Any]


async def _backend(path: Path, task: Task | None = None, **options: Any) -> OnnxBackend:
    opts = msgspec.convert(options, OnnxOptions)
    task = task or OnnxBackend.detect_task(path, opts)
    backend = OnnxBackend(
        LoadContext(model="m", version="1", task=task, source=str(path), path=path, options=opts)
    )
    await backend.load()
    return backend


class _RunCounter:
    """Rows per session.run, over every session of the version (narrow and wide)."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.rows: list[int] = []
        for runner in (backend._runner, backend._wide_runner):
            if runner is not None:
                runner._session = self._counting(runner._session)

    def _counting(self, session: Any) -> Any:
        real = session.run

        def run(names: Any, feeds: dict[str, Any]) -> Any:
            self.rows.append(len(feeds["input_ids"]))
            return real(names, feeds)

        return type("S", (), {"run": staticmethod(run)})()


async def test_embeddings_equal_direct_onnxruntime_pooling(
    tiny_encoder: Path, reference_embeddings: Reference
) -> None:
    backend = await _backend(tiny_encoder)
    assert backend.task == Task.EMBEDDINGS
    counter = _RunCounter(backend)
    batch = [EmbeddingRequest((SENTENCES[0],)), EmbeddingRequest(tuple(SENTENCES[1:]))]
    first, second = await backend.infer(batch)
    assert counter.rows == [4]  # both requests padded into one session.run
    ours = np.array(first.embeddings + second.embeddings)  # type: ignore[union-attr]
    expected = reference_embeddings(tiny_encoder, SENTENCES, 32)
    assert ours.shape == (4, 32)
    assert np.allclose(ours, expected, atol=1e-5)
    assert first.prompt_tokens == 8  # [CLS] + 6 words + [SEP]  # type: ignore[union-attr]
    assert backend.info().parameters["dimensions"] == 32


async def test_long_inputs_are_truncated_and_counted(
    tiny_encoder: Path, reference_embeddings: Reference
) -> None:
    backend = await _backend(tiny_encoder, max_length=8)
    (result,) = await backend.infer([EmbeddingRequest(("cat " * 50, "dog"))])
    assert result.truncated_inputs == 1  # type: ignore[union-attr]
    assert result.prompt_tokens == 8 + 3  # type: ignore[union-attr]
    assert np.allclose(
        result.embeddings[0],  # type: ignore[union-attr]
        reference_embeddings(tiny_encoder, ["cat " * 50], 8)[0],
        atol=1e-5,
    )


async def test_cls_pooling_without_normalisation(tiny_encoder: Path) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    backend = await _backend(tiny_encoder, pooling="cls", normalize=False)
    (result,) = await backend.infer([EmbeddingRequest(("hello world",))])
    enc = Tokenizer.from_file(str(tiny_encoder / "tokenizer.json")).encode("hello world")
    session = ort.InferenceSession(str(tiny_encoder / "model.onnx"))
    (hidden,) = session.run(
        ["last_hidden_state"],
        {
            "input_ids": np.array([enc.ids]),
            "attention_mask": np.array([enc.attention_mask]),
            "token_type_ids": np.array([enc.type_ids]),
        },
    )
    assert np.allclose(result.embeddings[0], hidden[0, 0], atol=1e-5)  # type: ignore[union-attr]


async def test_many_inputs_run_in_chunks_and_keep_their_order(
    tiny_encoder: Path, reference_embeddings: Reference
) -> None:
    backend = await _backend(tiny_encoder, max_batch_size=3)
    counter = _RunCounter(backend)
    texts = [" ".join(["cat"] * n) for n in (9, 1, 5, 2, 7, 3, 4)]
    (result,) = await backend.infer([EmbeddingRequest(tuple(texts))])
    assert counter.rows == [3, 3, 1]
    assert np.allclose(
        result.embeddings,
        reference_embeddings(tiny_encoder, texts, 32),  # type: ignore[union-attr]
        atol=1e-5,
    )


async def test_concurrent_runs_share_the_session_and_split_the_cores(
    start_onnx_api: Any, tiny_encoder: Path, reference_embeddings: Reference
) -> None:
    import asyncio

    api = await start_onnx_api({
        "name": "e", "backend": "onnx", "source": str(tiny_encoder), "task": "embeddings",
        "options": {"concurrent_runs": 2, "max_batch_size": 2},
    })
    version = api.service.registry.get("e")
    assert version.batcher is not None and version.batcher.concurrency == 2
    meta = (await api.client.get("/v2/models/e")).json()["parameters"]
    assert meta["concurrent_runs"] == 2
    from modelyard.backends.onnx.backend import usable_cores

    assert meta["intra_op_threads"] == max(1, usable_cores() // 2)
    texts = [" ".join(["cat"] * n) for n in range(1, 13)]
    replies = await asyncio.gather(*(
        api.client.post("/v1/embeddings", json={"model": "e", "input": t}) for t in texts
    ))
    got = np.array([r.json()["data"][0]["embedding"] for r in replies])
    assert np.allclose(got, reference_embeddings(tiny_encoder, texts, 32), atol=1e-5)


async def test_generation_runs_one_at_a_time_whatever_concurrent_runs_says(
    tiny_gpt2: Path,
) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION, concurrent_runs=4)
    assert backend.concurrent_batches == 1 and backend.max_batch_size == 1


def test_session_config_entries_reach_onnxruntime(tiny_encoder: Path) -> None:
    import onnxruntime as ort

    from modelyard.backends.onnx.backend import _session_options
    from modelyard.backends.onnx.layout import locate

    options = msgspec.convert(
        {"session_config": {"session.dynamic_block_base": "4"}, "intra_op_threads": 3},
        OnnxOptions,
    )
    so = _session_options(ort, options, locate(tiny_encoder, options.file), 3)
    assert so.get_session_config_entry("session.dynamic_block_base") == "4"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 3


async def test_classification_ranks_labels_from_config(tiny_classifier: Path) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    backend = await _backend(tiny_classifier)
    assert backend.task == Task.CLASSIFICATION
    assert backend.info().parameters["labels"] == list(LABELS.values())
    counter = _RunCounter(backend)
    results = await backend.infer(
        [
            ClassificationRequest(("a happy cat",)),
            ClassificationRequest(("a sad dog", "red"), top_k=1),
        ]
    )
    assert counter.rows == [3]
    ranked = results[0].labels[0]  # type: ignore[union-attr]
    assert sorted(label.label for label in ranked) == sorted(LABELS.values())
    assert [label.score for label in ranked] == sorted((x.score for x in ranked), reverse=True)
    assert sum(label.score for label in ranked) == pytest.approx(1.0, abs=1e-5)
    assert [len(labels) for labels in results[1].labels] == [1, 1]  # type: ignore[union-attr]
    enc = Tokenizer.from_file(str(tiny_classifier / "tokenizer.json")).encode("a happy cat")
    (logits,) = ort.InferenceSession(str(tiny_classifier / "model.onnx")).run(
        ["logits"],
        {
            "input_ids": np.array([enc.ids]),
            "attention_mask": np.array([enc.attention_mask]),
            "token_type_ids": np.array([enc.type_ids]),
        },
    )
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert ranked[0].label == LABELS[int(np.argmax(probs))]
    assert ranked[0].score == pytest.approx(float(probs.max()), abs=1e-5)


async def test_classification_over_http(start_onnx_api: Any, tiny_classifier: Path) -> None:
    api = await start_onnx_api({"name": "c", "backend": "onnx", "source": str(tiny_classifier)})
    meta = (await api.client.get("/v2/models/c")).json()
    assert meta["parameters"]["task"] == "classification"
    r = await api.client.post(
        "/v2/models/c/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good", "bad"]}]
        },
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert set(outputs["label"]["data"]) <= set(LABELS.values())


async def test_embeddings_over_openai_api(
    start_onnx_api: Any, tiny_encoder: Path, reference_embeddings: Reference
) -> None:
    api = await start_onnx_api(
        {"name": "e", "backend": "onnx", "source": str(tiny_encoder), "task": "embeddings"}
    )
    r = await api.client.post("/v1/embeddings", json={"model": "e", "input": SENTENCES[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([item["embedding"] for item in body["data"]])
    assert np.allclose(got, reference_embeddings(tiny_encoder, SENTENCES[:2], 32), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == 8 + 5  # [CLS] and [SEP] count


@pytest.mark.slow
async def test_minilm_demo_export_matches_direct_onnxruntime(
    minilm: Path, reference_embeddings: Reference
) -> None:
    backend = await _backend(minilm)
    assert backend.task == Task.EMBEDDINGS
    assert backend.info().parameters["max_length"] == 256  # sentence_bert_config.json
    texts = ["A man is eating food.", "modelyard serves ONNX models on CPU.", "hello " * 400]
    (result,) = await backend.infer([EmbeddingRequest(tuple(texts))])
    ours = np.array(result.embeddings)  # type: ignore[union-attr]
    expected = reference_embeddings(minilm, texts, 256)
    assert ours.shape == (3, 384)
    cosine = (ours * expected).sum(axis=1)
    assert cosine.min() >= 0.9999
    assert result.truncated_inputs == 1  # type: ignore[union-attr]


@pytest.mark.slow
async def test_minilm_over_openai_embeddings_end_to_end(
    start_onnx_api: Any, minilm: Path, reference_embeddings: Reference
) -> None:
    from openai import AsyncOpenAI

    api = await start_onnx_api(
        {"name": "all-minilm-l6-v2", "backend": "onnx", "source": str(minilm), "task": "embeddings"}
    )
    client = AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api.client)
    reply = await client.embeddings.create(
        model="all-minilm-l6-v2", input=["A man is eating food.", "A man eats."]
    )
    vectors = np.array([item.embedding for item in reply.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(
        vectors,
        reference_embeddings(minilm, ["A man is eating food.", "A man eats."], 256),
        atol=1e-4,
    )
    assert 0.5 < float(vectors[0] @ vectors[1]) < 1.0
