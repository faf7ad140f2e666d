"""Write small GGUF files for tests: a random Qwen2 model in llama.cpp's tensor names and metadata keys.

Qwen2 because transformers' GGUF loader derives every shape of it from the metadata (head_dim is
hidden / heads), so a tiny random model round-trips; float32 tensors, so the round trip is exact.
The tokenizer is the tiny qwen3 folder's byte-level BPE, written as a "gpt2" GGUF vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
_BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def make_qwen2_pair(tokenizer_dir: Path, out: Path) -> tuple[Path, Path]:
    """(Hugging Face folder, GGUF file) of one seeded random tiny Qwen2 model."""
    from gguf import GGUFWriter, TokenType
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)  # fmt: skip
    folder = out / "tiny-qwen2"
    Qwen2ForCausalLM(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, folder / name)

    file = out / "tiny-qwen2.gguf"
    writer = GGUFWriter(str(file), "qwen2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    tokens = [""] * config.vocab_size
    for text, index in {**tokenizer["model"]["vocab"], **added}.items():
        tokens[index] = text
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if text in added else TokenType.NORMAL for text in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template((folder / "chat_template.jinja").read_text())
    weights = load_file(str(folder / "model.safetensors"))

    def add(name: str, tensor: torch.Tensor) -> None:
        writer.add_tensor(name, tensor.float().numpy())

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    add("output.weight", weights["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            add(f"blk.{layer}.{gguf_name}.weight", weights[f"model.layers.{layer}.{hf_name}.weight"])
            if hf_name in _BIASED:
                add(f"blk.{layer}.{gguf_name}.bias", weights[f"model.layers.{layer}.{hf_name}.bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder, file
