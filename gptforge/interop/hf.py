"""Hugging Face transformers directories: export gptforge models, and load GPT-2-family checkpoints.

Export picks the transformers architecture that computes *exactly* our function, so that
`AutoModelForCausalLM.from_pretrained(DIR)` works without `trust_remote_code`:
- dense pre-LN models -> `GPT2LMHeadModel` (its c_attn/c_proj/c_fc are Conv1D, weights stored (in, out),
  the transpose of our nn.Linear);
- alternating dense/banded models (GPT-3) -> `GPTNeoForCausalLM`, whose "local" attention is our band
  (a query at t sees t-window+1..t). GPT-Neo does not scale scores by 1/sqrt(d_head) and has no q/k/v
  biases, so the scale is folded into q's weight, the k bias is dropped (it adds q·b_k, the same for every
  key of a query, which softmax cancels) and the v bias moves into the output bias (attention weights sum
  to one, so it reaches the output as W_o·b_v). A nonzero q bias has no exact equivalent and is refused.
Anything else (post-LN blocks, a q bias) is refused with the option to change, never approximated.

Import reads the weights with safetensors directly (no transformers needed): `GPT2LMHeadModel`/`GPT2Model`
checkpoints such as the official gpt2..gpt2-xl, and the GPT-Neo directories we export.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import UserError
from ..model import GPT
from ..outputs import HF_EXPORT, MODEL_DIR, Inputs, check_output, owned_output
from ..weights import model_from_state

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
# The GELU GPT-2 uses (tanh approximation); transformers names it either way.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Our per-block names -> GPT-2's, and whether the HF tensor is a Conv1D weight (stored transposed).
_GPT2_BLOCK = [
    ("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
    ("attn.c_attn.weight", "attn.c_attn.weight", True), ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.c_proj.weight", "attn.c_proj.weight", True), ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", True), ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", True), ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]


# ---------------------------------------------------------------------------------------------------
# Export


def hf_architecture(config: ModelConfig) -> str:
    """"gpt2" or "gpt_neo": the transformers model type that represents `config` exactly, or a UserError."""
    if config.norm != "pre":
        raise UserError(f"model option norm={config.norm!r}: GPT-2 and GPT-Neo in transformers are pre-LN, so a "
                        "post-LN model cannot be exported to Hugging Face; train with norm=\"pre\" to export")
    return "gpt_neo" if config.attention == "alternating" else "gpt2"


def full_state(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in fp32 on the CPU, with zero tensors where the model was built without biases (HF's
    layers always have them, and a zero bias computes the same thing), and vocabulary padding dropped."""
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: config.vocab_size]
    for key, value in list(state.items()):
        if key.endswith(".weight") and key.replace(".weight", ".bias") not in state and "wte" not in key \
                and "wpe" not in key:
            state[key.replace(".weight", ".bias")] = torch.zeros(value.shape[0])
    return state


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` state (tied lm_head left out, as transformers saves it)."""
    state = full_state(model)
    out = {f"transformer.{k}": state[f"transformer.{k}"]
           for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(model.config.n_layer):
        for ours, theirs, conv1d in _GPT2_BLOCK:
            t = state[f"transformer.h.{i}.{ours}"]
            out[f"transformer.h.{i}.{theirs}"] = t.t() if conv1d else t
    return out


def gpt_neo_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """`GPTNeoForCausalLM` state with the attention scale and k/v biases folded (see the module docstring)."""
    config = model.config
    state = full_state(model)
    C = config.n_embd
    out = {f"transformer.{k}": state[f"transformer.{k}"]
           for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(config.n_layer):
        p, q = f"transformer.h.{i}.", f"transformer.h.{i}.attn.attention."
        w, b = state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"]
        if torch.any(b[:C] != 0):
            raise UserError(
                f"layer {i} has a nonzero attention query bias, which GPT-Neo (the Hugging Face layout for "
                "alternating dense/banded attention) cannot represent exactly; such a model can only be exported "
                "if trained with model option qkv_bias=false (or bias=false) — export refused")
        w_o, b_o = state[p + "attn.c_proj.weight"], state[p + "attn.c_proj.bias"]
        out[q + "q_proj.weight"] = w[:C] / math.sqrt(config.head_dim)
        out[q + "k_proj.weight"] = w[C:2 * C]  # k bias: a per-query constant, cancelled by softmax
        out[q + "v_proj.weight"] = w[2 * C:]
        out[q + "out_proj.weight"] = w_o
        out[q + "out_proj.bias"] = b_o + w_o @ b[2 * C:]
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            out[p + name] = state[p + name]
    return out


def _gpt_neo_attention_types(n_layer: int) -> list:
    """Our pattern (even layers dense, odd banded) in GPT-Neo's run-length form; an odd layer count ends
    with one extra global layer."""
    types: list = [[["global", "local"], n_layer // 2]] if n_layer >= 2 else []
    if n_layer % 2:
        types.append([["global"], 1])
    return types


def hf_config(config: ModelConfig, eot_id: int | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The transformers `config.json` for `config` (written by hand: export does not need transformers)."""
    common = {"vocab_size": config.vocab_size, "layer_norm_epsilon": config.layer_norm_eps,
              "activation_function": "gelu_new", "initializer_range": config.init_std,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": True,
              "use_cache": True,
              # transformers before 4.56 reads "torch_dtype", later ones "dtype": both, so either loads it as stored
              "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}
    if hf_architecture(config) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": config.block_size,
                "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": config.ffn_dim, "resid_pdrop": config.dropout,
                "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, **common}
    return {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
            "max_position_embeddings": config.block_size, "hidden_size": config.n_embd,
            "num_layers": config.n_layer, "num_heads": config.n_head, "intermediate_size": config.ffn_dim,
            "attention_types": _gpt_neo_attention_types(config.n_layer), "window_size": config.window,
            "resid_dropout": config.dropout, "embed_dropout": config.dropout,
            "attention_dropout": config.dropout, **common}


def stop_token_ids(tokenizer: "Tokenizer | None", eot_id: int | None) -> int | list[int] | None:
    """generation_config's eos_token_id: for a chat model [<|im_end|>, end-of-text], so that
    `generate` ends a reply at the end of the turn (a single end-of-text id would let it run on)."""
    from ..chat.tokens import chat_token_ids, has_chat_tokens

    if tokenizer is None or not has_chat_tokens(tokenizer):
        return eot_id
    return [chat_token_ids(tokenizer)[1], tokenizer.eot_id]


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The transformers state dict for `model` in the architecture `hf_architecture` picks."""
    if hf_architecture(model.config) == "gpt2":
        return gpt2_tensors(model)
    return gpt_neo_tensors(model)


def export_hf(model: GPT, tokenizer: "Tokenizer | None", out: str | os.PathLike, force: bool = False,
              dtype: str = "f32", inputs: Inputs | None = None) -> Path:
    """Write `model` (and `tokenizer`'s transformers files) as a Hugging Face directory at `out`.

    The directory appears whole or not at all. Without a tokenizer only the model is written (the CLI
    insists on one, since AutoTokenizer would fail on such a directory). `force` replaces an earlier HF
    export only; `inputs` (option -> path) are what the export reads, which it never writes over.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not available for the hf format; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    check_output(out, HF_EXPORT, replace=force, inputs=inputs)
    torch_dtype = DTYPES[dtype]
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in hf_tensors(model).items()}
    config = hf_config(model.config, tokenizer.eot_id if tokenizer is not None else None, torch_dtype)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
                        "pass the tokenizer the model was trained with (--tokenizer)")
    with owned_output(out, HF_EXPORT, replace=force, inputs=inputs, command="export") as tmp:
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": stop_token_ids(tokenizer, config["eos_token_id"])},
            indent=2) + "\n")
        if tokenizer is not None:
            from .hf_tokenizer import write_hf_tokenizer
            write_hf_tokenizer(tokenizer, tmp, model_max_length=model.config.block_size)
    return out


# ---------------------------------------------------------------------------------------------------
# Import


def resolve_hf_source(source: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub repo id downloaded (config, weights, tokenizer files only).

    The hub is touched only when `source` is not a local directory, i.e. when the user asked for it.
    """
    path = Path(source)
    if path.is_dir():
        return path
    repo_id = str(source)
    if path.exists() or repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        raise UserError(f"{source}: not a directory holding a Hugging Face config.json; pass a local HF model "
                        "directory or a hub repo id such as gpt2")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source} is not a local directory and huggingface_hub is not installed to fetch it "
                        "from the hub; pip install huggingface_hub, or pass a local directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]))
    except Exception as e:  # network, unknown repo, offline mode: all mean "cannot get it", said in one line
        raise UserError(f"{source} is not a local directory and could not be fetched from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name "
                        "and the network, or pass a local directory") from None


def read_hf_config(path: Path) -> dict[str, Any]:
    file = path / HF_CONFIG
    if not file.is_file():
        raise UserError(f"{path} has no {HF_CONFIG}; pass a Hugging Face model directory")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); re-download or re-export the model") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{file} has no model_type; is it a Hugging Face model config?")
    return data


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All weights of an HF directory in fp32: one safetensors file, sharded safetensors, or (without
    pickle's code execution) a pytorch_model.bin read with weights_only=True."""
    try:
        if (path / HF_WEIGHTS).is_file():
            tensors = load_file(str(path / HF_WEIGHTS))
        elif (path / HF_WEIGHTS_INDEX).is_file():
            index = json.loads((path / HF_WEIGHTS_INDEX).read_text())
            tensors = {}
            for shard in sorted(set(index["weight_map"].values())):
                tensors.update(load_file(str(path / shard)))
        elif (path / HF_TORCH_WEIGHTS).is_file():
            tensors = torch.load(path / HF_TORCH_WEIGHTS, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{path} has no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or {HF_TORCH_WEIGHTS}; "
                            "the model weights are missing from that directory")
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"weights in {path} could not be read ({type(e).__name__}: {e}); they may be truncated: "
                        "re-download or re-export them") from None
    return {k: v.to(torch.float32) for k, v in tensors.items() if torch.is_floating_point(v)}


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the transformer body: `GPT2LMHeadModel` saves `transformer.h.0...`, `GPT2Model`
    (as the official gpt2 repo) saves `h.0...`."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        out[key] = value
    return out


def hf_model_config(source: str | os.PathLike) -> ModelConfig:
    """The gptforge ModelConfig of an HF GPT-2/GPT-Neo directory (or hub id), from its config.json alone."""
    source = resolve_hf_source(source)
    return _gptforge_config(read_hf_config(source), source)


def _gptforge_config(hf: dict[str, Any], source: Path) -> ModelConfig:
    """Our ModelConfig for an HF GPT-2 or GPT-Neo config, refusing settings we do not compute."""
    model_type = hf["model_type"]

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise UserError(f"{source / HF_CONFIG}: {what}; gptforge cannot load this model exactly")

    act = hf.get("activation_function", "gelu_new")
    need(act in TANH_GELU, f"activation_function {act!r} is not GPT-2's tanh GELU")
    if model_type == "gpt2":
        need(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is set")
        need(hf.get("scale_attn_weights", True), "scale_attn_weights is false")
        need(not hf.get("add_cross_attention", False), "add_cross_attention is set")
        n_embd = hf.get("n_embd", 768)
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
            d_ff=hf.get("n_inner") or None, dropout=float(hf.get("resid_pdrop", 0.0)),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))
    if model_type == "gpt_neo":
        n_layer = hf.get("num_layers", 12)
        layers = [kind for kinds, count in hf.get("attention_types", [[["global", "local"], 12]])
                  for _ in range(count) for kind in kinds]
        ours = ["local" if i % 2 else "global" for i in range(n_layer)]
        need(layers == ours, f"attention_types {hf.get('attention_types')} is not global/local alternating "
                             "starting with global, gptforge's GPT-3 pattern")
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("max_position_embeddings", 2048),
            n_layer=n_layer, n_head=hf.get("num_heads", 12), n_embd=hf.get("hidden_size", 2048),
            d_ff=hf.get("intermediate_size") or None, dropout=float(hf.get("resid_dropout", 0.0)),
            attention="alternating" if n_layer > 1 else "dense", window=hf.get("window_size", 256),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))
    raise UserError(f"{source / HF_CONFIG}: model_type {model_type!r} is not supported; gptforge loads GPT-2 "
                    "(gpt2) and GPT-Neo (gpt_neo) checkpoints")


def _our_tensors(config: ModelConfig, hf: dict[str, Any], tensors: dict[str, torch.Tensor],
                 source: Path) -> dict[str, torch.Tensor]:
    """Map HF tensors to our parameter names (inverse of the export mappings)."""
    t = _strip_prefix(tensors)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in t:
            raise UserError(f"weights in {source} lack tensor {key!r}; the checkpoint does not match its config.json")
        return t[key]

    wte = take("wte.weight")
    padded = torch.zeros(config.padded_vocab_size, config.n_embd)
    padded[: wte.shape[0]] = wte
    out["transformer.wte.weight"] = padded
    if "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], wte) \
            and hf.get("tie_word_embeddings", True) is False:
        raise UserError(f"{source}: the output head is not tied to the token embedding; gptforge models tie them")
    out["transformer.wpe.weight"] = take("wpe.weight")
    for k in ("ln_f.weight", "ln_f.bias"):
        out[f"transformer.{k}"] = take(k)
    C = config.n_embd
    for i in range(config.n_layer):
        p = f"h.{i}."
        if hf["model_type"] == "gpt2":
            for ours, theirs, conv1d in _GPT2_BLOCK:
                x = take(p + theirs)
                out[f"transformer.h.{i}.{ours}"] = x.t().contiguous() if conv1d else x
            continue
        a = p + "attn.attention."
        q_w = take(a + "q_proj.weight") * math.sqrt(config.head_dim)  # GPT-Neo does not scale scores
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
            [q_w, take(a + "k_proj.weight"), take(a + "v_proj.weight")], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * C)
        out[f"transformer.h.{i}.attn.c_proj.weight"] = take(a + "out_proj.weight")
        out[f"transformer.h.{i}.attn.c_proj.bias"] = take(a + "out_proj.bias")
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            out[f"transformer.h.{i}.{name}"] = take(p + name)
    return out


def load_hf_model(path: str | os.PathLike) -> "tuple[GPT, Tokenizer | None]":
    """A GPT-2-family Hugging Face checkpoint (local directory, or hub repo id when online) as a gptforge
    GPT in fp32, with its tokenizer when it is one gptforge can reproduce (else None)."""
    source = resolve_hf_source(path)
    hf = read_hf_config(source)
    config = _gptforge_config(hf, source)
    tensors = _our_tensors(config, hf, read_hf_tensors(source), source)
    model = model_from_state(config, tensors, str(source))
    from .hf_tokenizer import read_hf_tokenizer
    return model.eval(), read_hf_tokenizer(source)


def import_hf(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Convert an HF checkpoint into a gptforge checkpoint directory (`model.safetensors` + `tokenizer/`)."""
    from ..layout import TOKENIZER_DIR, WEIGHTS_FILE
    from ..weights import save_weights

    out = Path(out)
    inputs = {"SOURCE": os.fspath(source)}
    check_output(out, MODEL_DIR, replace=force, inputs=inputs)
    model, tokenizer = load_hf_model(source)
    with owned_output(out, MODEL_DIR, replace=force, inputs=inputs, command="import-hf") as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
    return out
