"""GGUF export for llama.cpp: architecture `gpt2`, tokenizer embedded.

Tensor names, layouts and metadata follow what llama.cpp's own converter (convert_hf_to_gguf.py, GPT-2)
writes: `token_embd`, `position_embd`, `blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
ffn_down}`, `output_norm`, each weight in PyTorch's (out, in) layout — which is ours already, where the
converter has to transpose HF's Conv1D. The output head is tied, so no `output.weight` is written:
llama.cpp falls back to the token embedding. Norms, biases and position embeddings stay f32 (as the
converter keeps them); `--dtype` applies to the 2-D weights, and q8_0 falls back to f16 for a matrix whose
rows are not a multiple of the 32-value block.

Refused, with the reason: band-attention layers (llama.cpp's gpt2 graph is dense causal only), post-LN
blocks, and char tokenizers (llama.cpp's "gpt2" tokenizer is byte-level BPE: a character vocabulary has no
byte tokens and no merges, so llama.cpp would tokenize text into ids our model never saw — export the
model with a bpe or gpt2 tokenizer, or use the HF export).

Chat models (a tokenizer with `<|im_start|>`/`<|im_end|>`) carry `tokenizer.chat_template` and
`<|im_end|>` as `tokenizer.ggml.eot_token_id`, next to end-of-text as eos: both end generation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..model import GPT
from ..outputs import GGUF_FILE, Inputs, check_output, owned_output
from .hf import full_state

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "gpt2"


def _import_gguf() -> Any:
    """The `gguf` package (llama.cpp's writer), an optional extra: a UserError says how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the 'gguf' package; pip install 'gptforge[gguf]'") from None
    return gguf


def _check_model(model: GPT) -> None:
    config = model.config
    if config.attention != "dense" or any(config.is_band_layer(i) for i in range(config.n_layer)):
        raise UserError("model option attention='alternating': llama.cpp's gpt2 architecture has only dense causal "
                        "attention, so banded layers cannot be exported to GGUF; export with --format hf "
                        "(GPT-Neo layout) instead")
    if config.norm != "pre":
        raise UserError(f"model option norm={config.norm!r}: llama.cpp's gpt2 architecture is pre-LN; "
                        "a post-LN model cannot be exported to GGUF")


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's gpt2 tensor names, fp32, (out, in) layout, vocabulary padding dropped."""
    state = {k: v.numpy() for k, v in full_state(model).items()}
    out = {"token_embd.weight": state["transformer.wte.weight"],
           "position_embd.weight": state["transformer.wpe.weight"],
           "output_norm.weight": state["transformer.ln_f.weight"],
           "output_norm.bias": state["transformer.ln_f.bias"]}
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(model.config.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = state[f"transformer.h.{i}.{ours}.{kind}"]
    return out


def _vocab(tokenizer: "Tokenizer", n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (GPT-2 byte-to-unicode spelling), token types and merges for llama.cpp's gpt2 tokenizer,
    padded with unused tokens up to the model's vocabulary size."""
    gguf = _import_gguf()

    from .hf_tokenizer import bpe_hf_tokenizer, byte_token, merges_from_ranks

    specials = {i: t for t, i in tokenizer.special_tokens.items()}
    if tokenizer.kind == "gpt2":
        from ..tokenizer.gpt2 import read_ranks
        ranks = read_ranks(tokenizer.ranks_path)
        by_id = {r: byte_token(t) for t, r in ranks.items()}
        merges = [f"{byte_token(a)} {byte_token(b)}" for a, b in merges_from_ranks(ranks)]
    elif tokenizer.kind == "bpe":
        import json
        hf = bpe_hf_tokenizer(tokenizer)
        model = json.loads(hf.to_str())["model"]
        by_id = {i: t for t, i in model["vocab"].items()}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    else:
        raise UserError(f"a {tokenizer.kind} tokenizer cannot be embedded in GGUF: llama.cpp's gpt2 tokenizer is "
                        "byte-level BPE, and a character vocabulary has no byte tokens or merges, so llama.cpp would "
                        "produce ids this model never saw; train with a gpt2 or bpe tokenizer, or use --format hf")
    if tokenizer.vocab_size > n_vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {n_vocab}; "
                        "pass the tokenizer the model was trained with (--tokenizer)")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in specials:
            tokens.append(specials[i])
            types.append(int(gguf.TokenType.CONTROL))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    return tokens, types, merges


def _add_chat(writer: Any, tokenizer: "Tokenizer") -> None:
    """A chat model's template and end of turn: llama.cpp renders `tokenizer.chat_template` (without it, it
    guesses ChatML) and ends generation at every end-of-generation id, eos and eot among them; the markers
    are already CONTROL tokens (all special tokens are), so they are never produced from user text."""
    from ..chat.session import chat_template
    from ..chat.tokens import chat_token_ids, has_chat_tokens

    template = chat_template(tokenizer)
    if template is None or not has_chat_tokens(tokenizer):  # a base model, even one whose tokenizer has markers
        return
    writer.add_chat_template(template)
    writer.add_eot_token_id(chat_token_ids(tokenizer)[1])


def _encode_tensor(name: str, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for one tensor under `dtype`, following llama.cpp's converter rules."""
    gguf = _import_gguf()

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2 or name.startswith("position_embd") or dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]):
        return data.astype(np.float16), None
    qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def export_gguf(model: GPT, tokenizer: "Tokenizer", out: str | os.PathLike, force: bool = False,
                dtype: str = "f16", inputs: Inputs | None = None) -> Path:
    """Write `model` and its tokenizer as one GGUF file for llama.cpp (atomically)."""
    gguf = _import_gguf()

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not available for gguf; choose one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; a GGUF export is one file, e.g. --out model.gguf")
    check_output(out, GGUF_FILE, replace=force, inputs=inputs)
    if tokenizer is None:
        raise UserError("GGUF embeds the tokenizer and this model has none; pass --tokenizer gpt2 or a tokenizer "
                        "directory")
    _check_model(model)
    config = model.config
    tokens, types, merges = _vocab(tokenizer, config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with owned_output(out, GGUF_FILE, replace=force, inputs=inputs, command="export") as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_name(out.stem)
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.ffn_dim)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_file_type(int(file_type))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # both kinds pre-tokenize with GPT-2's regex
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)
        _add_chat(writer, tokenizer)
        for name, data in gguf_tensors(model).items():
            array, raw = _encode_tensor(name, data, dtype)
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
