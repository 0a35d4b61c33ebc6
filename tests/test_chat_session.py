"""ChatSession: prompts rendered by the template, replies that stop at end of turn, streaming, context
overflow, seeds, reset/undo/save."""

from __future__ import annotations

import json

import pytest
from chat_models import chat_tokenizer, random_chat_model, scripted_model

from gptforge.chat import IM_END, IM_START, ChatSession, render_chat
from gptforge.chat.tokens import encode_chat_prompt
from gptforge.errors import UserError
from gptforge.generation import SamplingConfig, generate_ids

GREEDY = SamplingConfig(temperature=0, max_new_tokens=64)


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request):
    return chat_tokenizer(request.param)


def _marked(tok, text):
    return tok.encode(text, allowed_special=[IM_START, IM_END])


def test_prompt_ids_are_the_rendered_template(tok):
    session = ChatSession(random_chat_model(tok, end_at=100), tok, GREEDY, system="Be brief.")
    session.ask("hello there")
    messages = session.messages + [{"role": "user", "content": "the fox?"}]
    assert session.prompt_ids("the fox?") == _marked(tok, render_chat(messages, True))


def test_marker_text_typed_by_a_user_is_not_a_marker(tok):
    session = ChatSession(random_chat_model(tok, end_at=100), tok, GREEDY)
    ids = session.prompt_ids("a<|im_end|>b")
    specials = tok.special_tokens
    assert ids.count(specials[IM_END]) == 1 and ids.count(specials[IM_START]) == 2


def test_reply_is_the_greedy_continuation_cut_at_end_of_turn(tok):
    prompt = encode_chat_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    model = random_chat_model(tok, end_at=list(range(len(prompt) + 10, 256, 15)), block_size=256)
    session = ChatSession(model, tok, GREEDY, system="Be brief.")
    reply = session.ask("hello")
    expected = generate_ids(model, [prompt], GREEDY, eot_id=tok.special_tokens[IM_END])[0]
    assert reply == tok.decode(expected)
    assert session.last.finish_reason == "stop" and session.last.reply_tokens == len(expected) > 0
    # second turn: the whole conversation, first reply included, is the prompt
    second = session.ask("the fox?")
    prompt2 = encode_chat_prompt(tok, session.messages[:-1])
    expected2 = generate_ids(model, [prompt2], GREEDY, eot_id=tok.special_tokens[IM_END])[0]
    assert second == tok.decode(expected2) and session.last.prompt_tokens == len(prompt2) and expected2
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == reply


def _script_reply(tok, prompt_len, tokens, block_size=64):
    return scripted_model(tok.vocab_size, {prompt_len - 1 + i: t for i, t in enumerate(tokens)}, block_size)


@pytest.mark.parametrize("end", [IM_END, "<|endoftext|>", IM_START])
def test_stops_at_end_of_turn_or_end_of_text_without_printing_them(end):
    tok = chat_tokenizer("char")
    prompt_len = len(encode_chat_prompt(tok, [{"role": "user", "content": "hi"}]))
    a, b = tok.encode("ok")
    model = _script_reply(tok, prompt_len, [a, b, tok.special_tokens[end], a, a])
    session = ChatSession(model, tok, GREEDY)
    assert list(session.send("hi")) == ["o", "k"]
    assert session.last.finish_reason == "stop" and session.last.reply_tokens == 2
    assert session.last.generated_tokens == 3  # the end marker was generated too


def test_a_model_opening_a_new_turn_ends_its_reply_in_chat_and_in_training_samples(tok):
    """<|im_start|> is never a trained target, but a model can still favour it: the reply ends there (it is not
    printed, nor stored as the assistant's content), in ChatSession and in chat_replies (samples.txt) alike."""
    from gptforge.chat.replies import chat_replies

    messages = [{"role": "user", "content": "hello"}]
    prompt = encode_chat_prompt(tok, messages)
    im_start, im_end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    model = random_chat_model(tok, end_at=[len(prompt) + 3], marker=IM_START)  # the 5th token of the reply
    raw = generate_ids(model, [prompt], SamplingConfig(temperature=0, max_new_tokens=12), eot_id=im_end)[0]
    assert raw[4] == im_start and im_start not in raw[:4]  # the model does write it
    reference = tok.decode(raw[:4])
    session = ChatSession(model, tok, GREEDY)
    reply = session.ask("hello")
    assert reply == reference and IM_START not in reply and session.last.finish_reason == "stop"
    assert session.messages[-1] == {"role": "assistant", "content": reference}
    assert session.last.generated_tokens == 5 and session.last.reply_tokens == 4
    assert chat_replies(model, tok, [messages], max_new_tokens=12) == [reference]


def test_chat_replies_are_cut_at_each_end_id():
    from gptforge.chat.replies import chat_replies

    tok = chat_tokenizer("char")
    messages = [{"role": "user", "content": "hi"}]
    prompt_len = len(encode_chat_prompt(tok, messages))
    a, b = tok.encode("ok")
    for end in (IM_END, "<|endoftext|>", IM_START):
        model = _script_reply(tok, prompt_len, [a, b, tok.special_tokens[end], a, a])
        assert chat_replies(model, tok, [messages], max_new_tokens=8) == ["ok"], end


def test_a_character_split_across_tokens_is_never_printed_in_halves():
    tok = chat_tokenizer("bpe")
    e_acute = tok.encode("é")
    assert len(e_acute) == 2  # two byte tokens: the first ends inside the character
    prompt_len = len(encode_chat_prompt(tok, [{"role": "user", "content": "hi"}]))
    bang = tok.encode("!")
    model = _script_reply(tok, prompt_len, bang + e_acute + bang + [tok.special_tokens[IM_END]])
    pieces = list(ChatSession(model, tok, GREEDY).send("hi"))
    assert "".join(pieces) == "!é!" and "\ufffd" not in "".join(pieces)
    assert pieces == ["!", "é", "!"]


def test_length_limit_ends_the_reply():
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=120)
    session = ChatSession(model, tok, SamplingConfig(temperature=0, max_new_tokens=3))
    session.ask("hello")
    assert session.last.finish_reason == "length" and session.last.reply_tokens == 3


def test_oldest_exchanges_are_dropped_when_the_context_is_full_and_the_user_told_once():
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=10_000, block_size=96)  # never ends by itself: replies hit the limit
    notices = []
    session = ChatSession(model, tok, SamplingConfig(temperature=0, max_new_tokens=12), system="S.",
                          notify=notices.append)
    for q in ["one", "two", "three", "four", "five", "six"]:
        session.ask(q)
        assert session.last.prompt_tokens + 12 <= 96
    assert len(notices) == 1 and "context of 96 tokens" in notices[0]
    visible = session.visible_messages
    assert visible[0] == {"role": "system", "content": "S."}
    assert visible[1]["role"] == "user" and visible[1]["content"] != "one"
    assert len(session.messages) == 13  # everything is kept for /save
    prompt = encode_chat_prompt(tok, visible[:-1])
    assert session.last.prompt_tokens == len(prompt)


def test_a_message_longer_than_the_context_is_refused_and_changes_nothing():
    tok = chat_tokenizer("char")
    session = ChatSession(random_chat_model(tok, end_at=40), tok, GREEDY)
    with pytest.raises(UserError, match="too long"):
        session.send("x" * 200)
    assert session.messages == []


def test_a_seed_replays_the_whole_conversation():
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=100)
    config = SamplingConfig(temperature=1.0, max_new_tokens=16)

    def talk(seed):
        session = ChatSession(model, tok, config, seed=seed)
        return [session.ask(q) for q in ("hello", "more", "again")]

    assert talk(7) == talk(7)
    assert talk(7) != talk(8)


def test_reset_undo_system_and_save(tmp_path):
    tok = chat_tokenizer("char")
    session = ChatSession(random_chat_model(tok, end_at=80), tok, GREEDY, system="Be brief.")
    first = session.ask("hello")
    session.ask("more")
    assert session.undo() is True
    assert session.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                                {"role": "assistant", "content": first}]
    path = session.save(tmp_path / "talk.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"messages": session.messages}]
    session.set_system("Other.")
    assert session.messages[0]["content"] == "Other."
    session.reset()
    assert session.messages == [{"role": "system", "content": "Other."}]
    assert session.undo() is False


def test_a_stopped_reply_keeps_what_was_shown():
    tok = chat_tokenizer("char")
    session = ChatSession(random_chat_model(tok, end_at=120), tok, GREEDY)
    reply = session.send("hello")
    shown = next(reply)
    reply.close()  # what the CLI does on Ctrl-C
    assert session.last.finish_reason == "interrupted"
    assert session.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": shown}]


def test_an_unstarted_reply_adds_nothing():
    tok = chat_tokenizer("char")
    session = ChatSession(random_chat_model(tok, end_at=80), tok, GREEDY)
    session.send("hello")
    assert session.messages == []


def test_an_unstarted_reply_past_the_context_drops_nothing_and_tells_nobody():
    tok = chat_tokenizer("char")
    notices = []
    session = ChatSession(random_chat_model(tok, end_at=10_000, block_size=96), tok,
                          SamplingConfig(temperature=0, max_new_tokens=12), notify=notices.append)
    for q in ["one", "two"]:
        session.ask(q)
    assert notices == []
    before = session.visible_messages
    long = "three, which no longer fits beside both exchanges"
    assert len(session.prompt_ids(long)) + 12 > 96  # this turn drops exchanges: once it starts
    reply = session.send(long)
    assert session.visible_messages == before and notices == [] and len(session.messages) == 4
    "".join(reply)
    assert len(notices) == 1 and session.visible_messages[0] != before[0] and len(session.messages) == 6


def test_a_base_model_is_refused_with_the_way_to_a_chat_model():
    from gptforge.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["abc"])
    model = random_chat_model(chat_tokenizer("char"), end_at=10)
    with pytest.raises(UserError, match="gptforge sft"):
        ChatSession(model, tok)


def test_interrupt_inside_generation_keeps_the_conversation_well_formed(monkeypatch):
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=120)
    session = ChatSession(model, tok, GREEDY)
    calls = {"n": 0}
    original = model.head

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "head", interrupted)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.send("hello"):
            pieces.append(piece)
    assert session.last.finish_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}


def test_load_continues_a_saved_conversation_and_refuses_malformed_ones(tmp_path):
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(70, 256, 20)), block_size=256)
    talked = ChatSession(model, tok, GREEDY, system="Be brief.")
    talked.ask("hello")
    saved = json.loads(talked.save(tmp_path / "t.jsonl").read_text(encoding="utf-8"))["messages"]
    resumed = ChatSession(model, tok, GREEDY)
    resumed.load(saved)
    assert resumed.messages == talked.messages and resumed.ask("more") == talked.ask("more")
    for bad in ([{"role": "user", "content": "a"}],
                [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                # malformed messages: the template's ChatFormatError, as a UserError (a user's file)
                [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}],
                [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}],
                ["user: a"]):
        with pytest.raises(UserError):
            resumed.load(bad)
    assert resumed.messages == talked.messages  # a refused load changes nothing
