"""The GGUF header check that runs before llama.cpp sees a file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf_testing import CHATML, MakeGGUF

from modelyard.backends.llamacpp.header import read_header
from modelyard.core.errors import ModelLoadError


def test_reads_architecture_context_quantisation_template_and_special_tokens(
    tiny_gguf: Path,
) -> None:
    header = read_header(tiny_gguf)
    assert header.version == 3
    assert header.architecture == "llama"
    assert header.name == "tiny-llama-test"
    assert header.context_length == 512
    assert header.quantization == "ALL_F32"
    assert header.chat_template == CHATML
    assert (header.bos_token_id, header.eos_token_id, header.add_bos_token) == (1, 2, True)
    assert header.pooling_type is None and not header.is_embedding_model
    assert header.tensor_count == 3 + 2 * 9
    # Vocabulary-sized arrays are skipped, scalars kept.
    assert "tokenizer.ggml.tokens" not in header.metadata
    assert header.metadata["llama.block_count"] == 2


def test_a_directory_with_one_gguf_file_reads_that_file(tiny_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    assert read_header(tmp_path).architecture == "llama"


def test_a_truncated_file_names_where_the_data_ends(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelLoadError, match=r"truncated GGUF file cut\.gguf: tensor data ends at byte"
    ):
        read_header(cut)


def test_a_file_cut_inside_the_metadata_is_truncated_too(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="truncated GGUF file"):
        read_header(cut)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04" + b"\0" * 64, "not a GGUF file .magic b'PK"),
        (b"GGUF" + struct.pack("<I", 7) + b"\0" * 16, "unsupported GGUF version 7"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "corrupt GGUF header"),
    ],
)
def test_a_file_that_is_not_gguf_says_why(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=reason):
        read_header(path)


def test_embedding_models_are_recognised_by_their_pooling_type(make_gguf: MakeGGUF) -> None:
    header = read_header(make_gguf("tiny-embed", chat_template=None, pooling_type=1))
    assert header.pooling_type == 1 and header.is_embedding_model
    assert header.chat_template is None


def test_real_gemma_header(gemma_gguf: Path) -> None:
    header = read_header(gemma_gguf)
    assert (header.architecture, header.quantization, header.context_length) == (
        "gemma3", "Q4_K_M", 32768
    )
    assert header.chat_template is None
    assert header.add_bos_token is True
