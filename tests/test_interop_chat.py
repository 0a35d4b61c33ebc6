"""Exports of chat models work unchanged in other tools: transformers renders the same prompt ids from the
exported template and its `generate` stops at end of turn with gptforge's greedy reply; GGUF carries the
template, the end-of-turn id and the markers as control tokens; import-hf keeps the template."""

from __future__ import annotations

import json

import pytest
import torch
from chat_models import chat_tokenizer, random_chat_model

from gptforge.chat import CHAT_TEMPLATE, IM_END, IM_START, ChatSession
from gptforge.chat.tokens import encode_chat_prompt
from gptforge.generation import SamplingConfig
from gptforge.interop.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick fox?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "and the lazy dog, é?"}],
]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=100)


def _tokenizer(kind, request):
    if kind == "gpt2":
        from gptforge.chat.tokens import add_chat_tokens
        from gptforge.tokenizer import GPT2Tokenizer
        return add_chat_tokens(GPT2Tokenizer(request.getfixturevalue("gpt2_ranks")))
    return chat_tokenizer(kind)


@pytest.fixture(params=["char", "bpe", "gpt2"])
def tok(request):
    return _tokenizer(request.param, request)


def _chat_model(tok):
    """Random weights, with the position 8 tokens after each test prompt (and every 12th after the longest)
    pushed to <|im_end|>: each greedy reply is the random model's own text for a few tokens and then ends
    (see chat_models)."""
    lengths = [len(encode_chat_prompt(tok, m)) for m in CONVERSATIONS]
    first = {n - 1 for n in lengths}  # where each reply's first token is chosen: never forced
    ends = {n + 8 + (n + 8 in first) for n in lengths}
    ends |= set(range(max(ends) + 12, 256, 12)) - first
    return random_chat_model(tok, end_at=sorted(ends), block_size=256)


def _gptforge_reply(model, tok, messages):
    session = ChatSession(model, tok, GREEDY)
    session.load(messages[:-1])  # the system message and earlier exchanges
    pieces = list(session.send(messages[-1]["content"]))
    assert session.last.finish_reason == "stop"
    return "".join(pieces), session.last.reply_tokens


def test_hf_export_renders_the_same_prompt_and_generates_the_same_reply(tmp_path, tok):
    model = _chat_model(tok)
    out = export_hf(model, tok, tmp_path / "hf")
    im_end = tok.special_tokens[IM_END]
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, tok.eot_id]

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_tok.convert_tokens_to_ids([IM_START, IM_END]) == [tok.special_tokens[IM_START], im_end]
    for messages in CONVERSATIONS:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == encode_chat_prompt(tok, messages)
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          do_sample=False, max_new_tokens=100, pad_token_id=tok.eot_id)
        new = generated[0, len(ids):].tolist()
        assert new[-1] == im_end and im_end not in new[:-1]  # stopped at end of turn, not at max_new_tokens
        reply, n = _gptforge_reply(model, tok, messages)
        assert n == len(new) - 1 > 0
        assert hf_tok.decode(new[:-1]) == reply


def test_import_hf_keeps_the_chat_template_and_the_markers(tmp_path, tok):
    from gptforge.loading import load_model

    model = _chat_model(tok)
    imported = import_hf(export_hf(model, tok, tmp_path / "hf"), tmp_path / "ckpt")
    model2, tok2 = load_model(str(imported))
    assert tok2.kind == tok.kind and tok2.special_tokens == tok.special_tokens
    assert tok2.chat_template == CHAT_TEMPLATE
    assert (imported / "tokenizer" / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    messages = CONVERSATIONS[1]
    assert _gptforge_reply(model2, tok2, messages) == _gptforge_reply(model, tok, messages)


def test_a_base_model_export_has_no_chat_template(tmp_path):
    from gptforge.tokenizer import CharTokenizer

    base = CharTokenizer.train(["hello world"])
    model = random_chat_model(chat_tokenizer("char"), end_at=10)
    out = export_hf(model, base, tmp_path / "hf")
    assert not (out / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == base.eot_id


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_gguf_carries_template_end_of_turn_and_control_markers(tmp_path, kind, request):
    gguf = pytest.importorskip("gguf")
    from gptforge.interop.gguf import export_gguf

    tok = _tokenizer(kind, request)  # llama.cpp's gpt2 tokenizer is byte-level BPE: no char kind
    out = export_gguf(_chat_model(tok), tok, tmp_path / "chat.gguf", dtype="f32")
    reader = gguf.GGUFReader(str(out))

    def value(key):
        return reader.fields[key].contents()

    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    assert value("tokenizer.ggml.eot_token_id") == tok.special_tokens[IM_END]
    assert value("tokenizer.ggml.eos_token_id") == tok.eot_id
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    for marker in (IM_START, IM_END):
        i = tok.special_tokens[marker]
        assert tokens[i] == marker and types[i] == int(gguf.TokenType.CONTROL)


@pytest.mark.slow
def test_llama_cpp_chat_completion_stops_at_end_of_turn(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from gptforge.interop.gguf import export_gguf

    tok = chat_tokenizer("bpe")
    model = _chat_model(tok)
    out = export_gguf(model, tok, tmp_path / "chat.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False, seed=0)
    messages = CONVERSATIONS[1]
    result = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=100)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == _gptforge_reply(model, tok, messages)[0]
