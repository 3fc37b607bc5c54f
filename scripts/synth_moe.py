#!/usr/bin/env python3
"""Writes a random-weight F16 GGUF with the shape of Qwen3-30B-A3B (qwen3moe: 128 experts, 8 per
token, expert width 768, hidden 2048, 32 query and 4 key/value heads of 128, q/k norms), with
fewer layers so that it fits in this machine's memory, for measuring mixture-of-experts speed
against llama.cpp. Speed does not depend on the weights' values; per-token work scales with the
layer count, so the ratio to llama.cpp does not depend on it either.

Quantize the result with llama.cpp's llama-quantize, e.g.
    llama-quantize moe-f16.gguf moe-q4_k_m.gguf Q4_K_M
then  llm-worker-rbee-bench -m moe-q4_k_m.gguf --llama-bench PATH

Usage:  scripts/synth_moe.py OUT.gguf [--layers 6] [--vocab-dir DIR]
The tokenizer metadata comes from llama.cpp's Qwen2 vocabulary file (ggml-vocab-qwen2.gguf,
fetched by scripts/fetch-llamacpp-vocabs.sh). Needs the PyPI packages gguf and numpy; tensors
are generated and written one at a time.
"""
import argparse
import os

import gguf
import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, USED, EXPERT_FF = 128, 8, 768
N_VOCAB = 151936


def vocab_fields(path):
    """The tokenizer.* key-values of a vocabulary GGUF, decoded."""
    src = gguf.GGUFReader(path)
    out = {}
    for name, f in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(f.parts[i]).decode("utf-8", "surrogatepass") for i in f.data]
            else:
                out[name] = [int(f.parts[i][0]) for i in f.data]
        elif t == gguf.GGUFValueType.STRING:
            out[name] = bytes(f.parts[f.data[0]]).decode()
        else:
            out[name] = f.parts[f.data[0]][0].item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab-dir",
                    default=os.path.expanduser("~/.cache/llm-worker-rbee/llamacpp-vocabs"))
    a = ap.parse_args()
    tok = vocab_fields(os.path.join(a.vocab_dir, "ggml-vocab-qwen2.gguf"))
    tokens = tok["tokenizer.ggml.tokens"]
    types = tok["tokenizer.ggml.token_type"]
    if len(tokens) < N_VOCAB:  # the embedding has padding rows beyond the vocabulary
        types = types + [gguf.TokenType.UNUSED] * (N_VOCAB - len(tokens))
        tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), N_VOCAB)]

    w = gguf.GGUFWriter(a.out, "qwen3moe")
    w.add_name("synthetic-qwen3-30b-a3b-shape")
    w.add_block_count(a.layers)
    w.add_context_length(32768)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(USED)
    w.add_expert_feed_forward_length(EXPERT_FF)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "tokenizer.ggml.merges" in tok:
        w.add_token_merges(tok["tokenizer.ggml.merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in tok:
            add(int(tok[f"tokenizer.ggml.{key}_token_id"]))

    f16, f32 = np.float16, np.float32
    plan = [("token_embd.weight", (N_VOCAB, HIDDEN), f16),
            ("output_norm.weight", (HIDDEN,), f32),
            ("output.weight", (N_VOCAB, HIDDEN), f16)]
    for i in range(a.layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (HIDDEN,), f32),
                 (p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), f16),
                 (p + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), f16),
                 (p + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), f16),
                 (p + "attn_q_norm.weight", (HEAD_DIM,), f32),
                 (p + "attn_k_norm.weight", (HEAD_DIM,), f32),
                 (p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), f16),
                 (p + "ffn_norm.weight", (HIDDEN,), f32),
                 # The router stays F32, as the converter writes it.
                 (p + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), f32),
                 (p + "ffn_gate_exps.weight", (EXPERTS, EXPERT_FF, HIDDEN), f16),
                 (p + "ffn_up_exps.weight", (EXPERTS, EXPERT_FF, HIDDEN), f16),
                 (p + "ffn_down_exps.weight", (EXPERTS, HIDDEN, EXPERT_FF), f16)]
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape, dtype in plan:
        if name.endswith("norm.weight"):
            t = np.ones(shape, f32)
        elif len(shape) == 3:  # one expert at a time, so the f32 temporaries stay small
            w.write_tensor_data(np.stack(
                [(rng.standard_normal(shape[1:], dtype=f32) * 0.02).astype(f16)
                 for _ in range(shape[0])]))
            continue
        else:
            t = (rng.standard_normal(shape, dtype=f32) * 0.02).astype(dtype)
        w.write_tensor_data(t)
    w.close()
    print(a.out)


if __name__ == "__main__":
    main()
