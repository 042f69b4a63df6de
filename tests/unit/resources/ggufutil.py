"""Write small but real GGUF files with the ``gguf`` package (llama.cpp's own writer)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_llama_gguf(
    path: Path,
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    embedding: int = 64,
    context: int = 2048,
    vocab: int = 300,
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> Path:
    """A llama-architecture GGUF with F32, F16 and Q8_0 tensors and a tokenizer vocabulary."""
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_name("tiny-llama-test")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_feed_forward_length(embedding * 4)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list([f"tok{i}" for i in range(vocab)])  # a long array to skip
    writer.add_array("test.small_list", [1, 2, 3])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, embedding), np.float32))
    for layer in range(layers):
        q = rng.standard_normal((embedding, embedding)).astype(np.float32)
        qq = gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(
            f"blk.{layer}.attn_q.weight", qq, raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
        writer.add_tensor(
            f"blk.{layer}.attn_norm.weight", rng.standard_normal(embedding).astype(np.float16)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
