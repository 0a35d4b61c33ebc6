"""Chat markers in the tokenizer and conversations as (ids, loss mask): masks checked by hand, ids checked
against encoding the rendered text with the markers allowed (what transformers and llama.cpp do)."""

from __future__ import annotations

import numpy as np
import pytest

from gptforge.chat import CHAT_TEMPLATE, IM_END, IM_START, render_chat
from gptforge.chat.tokens import add_chat_tokens, chat_token_ids, encode_chat, encode_chat_prompt
from gptforge.errors import UserError
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer, train_bpe

CORPUS = ["system user assistant\nhi yo ok? no. Be brief! 0123456789 <|>_ abcdefghijklmnopqrstuvwxyz"]
TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "no"}]


@pytest.fixture(params=["gpt2", "char", "bpe"])
def chat_tok(request):
    if request.param == "gpt2":
        tok = GPT2Tokenizer(request.getfixturevalue("gpt2_ranks"))
    elif request.param == "char":
        tok = CharTokenizer.train(CORPUS)
    else:
        tok = train_bpe(CORPUS * 20, vocab_size=300)
    return add_chat_tokens(tok)


def test_two_turn_masks_by_hand():
    tok = add_chat_tokens(CharTokenizer.train(CORPUS))
    S, E = chat_token_ids(tok)
    c = lambda text: [tok.chars.index(ch) for ch in text]  # noqa: E731  (one id per character)
    ids, mask = encode_chat(tok, TWO_TURNS)
    expected = ([S] + c("user\nhi") + [E] + c("\n") + [S] + c("assistant\nyo") + [E] + c("\n")
                + [S] + c("user\nok?") + [E] + c("\n") + [S] + c("assistant\nno") + [E] + c("\n"))
    assert ids == expected
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == c("yo") + [E] + c("no") + [E]  # both replies and their end-of-turn, nothing else
    # position by position: the assistant header and the newline after <|im_end|> are not trained
    first = len(c("user\nhi")) + 3 + 1 + len("assistant\n")
    assert mask[first - 1] == 0 and list(mask[first:first + 3]) == [1, 1, 1] and mask[first + 3] == 0


def test_gpt2_markers_take_the_first_padded_ids(gpt2_ranks, tmp_path):
    tok = add_chat_tokens(GPT2Tokenizer(gpt2_ranks))
    assert chat_token_ids(tok) == (50257, 50258) and tok.vocab_size == 50259
    ids, mask = encode_chat(tok, [{"role": "user", "content": "Hello world"},
                                  {"role": "assistant", "content": "Hello world"}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello world<|im_end|>"
    assert ids[:4] == [50257, tok.encode("user")[0], 198, 15496]  # <|im_start|> user \n Hello
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    again = load_tokenizer(tmp_path / "tok")
    assert again.chat_template == CHAT_TEMPLATE and again.special_tokens == tok.special_tokens
    assert encode_chat(again, TWO_TURNS)[0] == encode_chat(tok, TWO_TURNS)[0]


CONVERSATIONS = [TWO_TURNS,
                 [{"role": "system", "content": "Be brief!"}, {"role": "user", "content": "0123?"},
                  {"role": "assistant", "content": "\n\n  ok. 4567"}],
                 [{"role": "user", "content": " hi"}, {"role": "assistant", "content": " no "}]]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_ids_equal_the_rendered_text_encoded_with_markers_allowed(chat_tok, messages, generation_prompt):
    ids, mask = encode_chat(chat_tok, messages, generation_prompt)
    reference = chat_tok.encode(render_chat(messages, generation_prompt), allowed_special={IM_START, IM_END})
    assert ids == reference and len(mask) == len(ids)
    # the trained ids decode to each reply plus its end-of-turn marker (leading whitespace merged into the
    # header's newline by BPE is trained with the reply; it carries the reply's bytes)
    replies = "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
    trained = chat_tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.lstrip("\n") == replies.lstrip("\n") and trained.endswith(IM_END)


def test_marker_text_inside_a_message_stays_ordinary_text(chat_tok):
    S, E = chat_token_ids(chat_tok)
    ids, mask = encode_chat(chat_tok, [{"role": "user", "content": "a <|im_end|> b <|im_start|>"},
                                       {"role": "assistant", "content": "no <|im_end|>"}])
    assert ids.count(S) == 2 and ids.count(E) == 2  # only the four markers the renderer placed
    assert ids[-2] == E and mask[-2] == 1 and chat_tok.decode(ids) == render_chat(
        [{"role": "user", "content": "a <|im_end|> b <|im_start|>"}, {"role": "assistant", "content": "no <|im_end|>"}])


def test_generation_prompt_and_idempotent_markers(chat_tok):
    before = chat_tok.vocab_size
    add_chat_tokens(chat_tok)  # SFT of an SFT model: the markers are kept, not added twice
    assert chat_tok.vocab_size == before
    prompt = encode_chat_prompt(chat_tok, TWO_TURNS[:1])
    assert chat_tok.decode(prompt) == render_chat(TWO_TURNS[:1], add_generation_prompt=True)


def test_a_tokenizer_without_markers_is_named():
    with pytest.raises(UserError, match="gptforge sft"):
        encode_chat(CharTokenizer.train(CORPUS), TWO_TURNS)
    assert np.asarray(encode_chat(add_chat_tokens(CharTokenizer.train(CORPUS)), TWO_TURNS)[1]).dtype == np.uint8


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_session_encodes_the_ids_training_uses(chat_tok, messages):
    from gptforge.chat import ChatSession
    from gptforge.config import ModelConfig
    from gptforge.model import GPT

    model = GPT(ModelConfig(vocab_size=chat_tok.vocab_size, block_size=512, n_layer=1, n_head=1, n_embd=8))
    session = ChatSession(model, chat_tok)
    session.load(messages)
    expected = encode_chat(chat_tok, messages + [{"role": "user", "content": "next?"}], True)[0]
    assert session.prompt_ids("next?") == expected
