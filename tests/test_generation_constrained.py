"""Constrained decoding (JSON mode, JSON schema) and logit_bias: every reply parses and validates, the
tokenizer is described to the grammar engine exactly, ending only where the grammar is complete, rows
without constraints untouched by constrained neighbours, bad schemas as one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jsonschema
import pytest
import torch
from chat_models import chat_tokenizer, random_chat_model, save_chat_checkpoint

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.generation import SamplingConfig, TokenGenerator, generate
from gptforge.generation import constrained as C
from gptforge.generation.sampling import Sampler
from gptforge.model import GPT

# nested objects, arrays, enums, required fields, numbers, strings (escapes allowed); bounded, so a
# random-weight model finishes within max_new_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}


def random_model(tok, seed: int = 0, block: int = 256) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def run(model, tok, prompts, configs, seed=0, **kwargs):
    """texts, finish reasons, token ids of each completion."""
    n = len(configs) if isinstance(configs, list) else len(prompts) * kwargs.get("num_samples", 1)
    texts, reasons, tokens = [""] * n, [None] * n, [[] for _ in range(n)]
    for e in generate(model, tok, prompts, configs, seed=seed, **kwargs):
        texts[e.index] += e.text
        tokens[e.index].append(e.token)
        reasons[e.index] = e.finish_reason or reasons[e.index]
    return texts, reasons, tokens


# ---- the tokenizer as the engine sees it ------------------------------------------------------------------

def _check_engine_view(tok):
    engine = C.engine_tokenizer(tok)
    specials = set(tok.special_tokens.values())
    assert engine.vocab_size == tok.vocab_size
    for i in range(tok.vocab_size):
        if i in specials:
            assert engine.is_special_token(i), i
        elif tok.decode_bytes([i]).startswith(b"\xff"):
            # the engine's special-token prefix: a byte no UTF-8 text has, so such a token can never be part
            # of JSON output either way; the engine treats it as special (never allowed as text)
            assert engine.is_special_token(i), i
        else:
            assert not engine.is_special_token(i), i
            assert engine.decode_bytes([i]) == tok.decode_bytes([i]), i


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_engine_sees_every_token_exactly(kind):
    _check_engine_view(chat_tokenizer(kind))


def test_engine_sees_gpt2_exactly(gpt2_ranks):
    from gptforge.tokenizer import GPT2Tokenizer
    _check_engine_view(GPT2Tokenizer())


def test_engine_view_follows_added_special_tokens():
    from gptforge.tokenizer import CharTokenizer
    tok = CharTokenizer.train(["ab{}"])
    assert C.engine_tokenizer(tok).vocab_size == tok.vocab_size
    tok.add_special_tokens(["<|x|>"])
    assert C.engine_tokenizer(tok).vocab_size == tok.vocab_size
    assert C.engine_tokenizer(tok).is_special_token(tok.special_tokens["<|x|>"])


# ---- output follows the grammar --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_fifty_schema_replies_of_a_random_model_validate(kind):
    tok = chat_tokenizer(kind)
    config = SamplingConfig(max_new_tokens=220, temperature=1.0, json_schema=SCHEMA)
    texts, reasons, _ = run(random_model(tok), tok, ["x"], config, num_samples=50, seed=3)
    assert reasons == ["stop"] * 50
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 40  # sampled, not one forced string


def test_json_object_replies_parse_or_say_length():
    tok = chat_tokenizer("bpe")
    config = SamplingConfig(max_new_tokens=120, temperature=1.0, json_object=True)
    texts, reasons, _ = run(random_model(tok, seed=1), tok, ["x"], config, num_samples=50, seed=5)
    assert set(reasons) <= {"stop", "length"} and "stop" in reasons
    for text, reason in zip(texts, reasons):
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_new_tokens mid-JSON: reported as such, never as "stop"
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)


def test_a_model_that_wants_to_end_early_ends_only_when_the_json_is_complete():
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(2, 256)), block_size=256)  # after "abc": <|im_end|> at once
    from gptforge.chat.tokens import reply_end_ids
    ends = reply_end_ids(tok)
    config = SamplingConfig(max_new_tokens=200, temperature=0, json_schema=SCHEMA)
    engine = TokenGenerator(model, [tok.encode("abc")], [config], [None], eot_id=ends, tokenizer=tok)
    events = [e for step in engine for e in step]
    assert events[-1].finish_reason == "stop" and events[-1].token in ends
    text = tok.decode([e.token for e in events[:-1]])
    jsonschema.validate(json.loads(text), SCHEMA)
    # free, the same model ends at once
    free = TokenGenerator(model, [tok.encode("abc")], [config.replace(json_schema=None)], [None], eot_id=ends)
    assert [e.token for step in free for e in step] == [events[-1].token]


def test_max_new_tokens_mid_json_is_length():
    tok = chat_tokenizer("char")
    texts, reasons, _ = run(random_model(tok), tok, ["x"], SamplingConfig(max_new_tokens=4, json_schema=SCHEMA))
    assert reasons == ["length"] and len(texts[0]) == 4 and texts[0].startswith('{"')


def test_without_end_ids_a_complete_grammar_ends_the_row():
    tok = chat_tokenizer("char")
    config = SamplingConfig(max_new_tokens=300, temperature=1.0, json_schema=SCHEMA, stop_at_eot=False)
    texts, reasons, _ = run(random_model(tok), tok, ["x"], config, num_samples=5, seed=2)
    assert reasons == ["stop"] * 5
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_chat_session_json_reply():
    from gptforge.chat import ChatSession
    tok = chat_tokenizer("bpe")
    model = random_chat_model(tok, end_at=list(range(0, 512)), block_size=512)
    session = ChatSession(model, tok, SamplingConfig(temperature=0.8, max_new_tokens=300, json_schema=SCHEMA), seed=1)
    for question in ("who?", "again"):
        jsonschema.validate(json.loads(session.ask(question)), SCHEMA)
        assert session.last.finish_reason == "stop"


# ---- rows without constraints pay nothing and are unchanged -----------------------------------------------

def test_free_rows_are_unchanged_by_constrained_neighbours():
    tok = chat_tokenizer("bpe")
    model = random_model(tok)
    free = SamplingConfig(max_new_tokens=40, temperature=0.9, top_p=0.9)
    json_row = free.replace(max_new_tokens=200, json_schema=SCHEMA)
    biased = free.replace(logit_bias={5: -100, 6: 3.5})
    alone = run(model, tok, ["ab", "cd"], [free, free], seed=[11, 12])[2]
    mixed = run(model, tok, ["ab", "zz", "cd", "yy"], [free, json_row, free, biased], seed=[11, 99, 12, 7])[2]
    assert mixed[0] == alone[0] and mixed[2] == alone[1]


def test_a_sampler_without_constraints_leaves_logits_alone():
    logits = torch.randn(3, 10)
    assert C.apply_constraints(logits, [None, None, None]) is logits


# ---- logit_bias ------------------------------------------------------------------------------------------

def test_logit_bias_is_added_and_minus_100_bans():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0], [1.0, 5.0, 2.0, 0.0]])
    rows = [C.RowConstraint(logit_bias={1: -100, 2: 0.5, 3: 100}), None]
    out = C.apply_constraints(logits, rows)
    assert out[0].tolist() == [1.0, float("-inf"), 2.5, 100.0]
    assert out[1].tolist() == logits[1].tolist()
    sampler = Sampler([SamplingConfig(temperature=0, logit_bias={1: -100})], [None], [[0]], 4, torch.device("cpu"))
    assert sampler.choose(logits[:1]).tolist() == [2]
    # through the engine: a banned token never comes, a strongly favoured one always does
    tok = chat_tokenizer("char")
    model = random_model(tok)
    top = run(model, tok, ["x"], SamplingConfig(max_new_tokens=8, temperature=0, stop_at_eot=False))[2][0]
    banned = run(model, tok, ["x"], SamplingConfig(max_new_tokens=8, temperature=0, stop_at_eot=False,
                                                   logit_bias={top[0]: -100}))[2][0]
    assert top[0] not in banned
    forced = run(model, tok, ["x"], SamplingConfig(max_new_tokens=8, temperature=1.0, stop_at_eot=False,
                                                   logit_bias={"7": 100}), seed=1)[2][0]
    assert forced == [7] * 8


@pytest.mark.parametrize("bias, message", [({1: 101}, "[-100, 100]"), ({-1: 1}, "token ids"),
                                           ({"a": 1}, "token ids"), ({1: "x"}, "[-100, 100]")])
def test_bad_logit_bias(bias, message):
    with pytest.raises(UserError, match="logit.bias") as e:
        SamplingConfig(logit_bias=bias)
    assert message in str(e.value)


def test_logit_bias_outside_the_vocabulary():
    with pytest.raises(UserError, match="outside the vocabulary"):
        Sampler([SamplingConfig(logit_bias={10: 1})], [None], [[0]], 10, torch.device("cpu"))


def test_a_bias_that_bans_every_token_the_grammar_allows_gives_way_to_the_grammar():
    tok = chat_tokenizer("char")
    brace = tok.encode("{")[0]
    config = SamplingConfig(json_schema=SCHEMA, max_new_tokens=220, logit_bias={brace: -100})
    texts, reasons, _ = run(random_model(tok), tok, ["x"], config)
    assert reasons == ["stop"]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)


# ---- bad schemas: one line, quickly ----------------------------------------------------------------------

@pytest.mark.parametrize("schema, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"type": "strin"}, "Invalid type"),
    ({"not": {"type": "string"}}, "Unimplemented keys"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "Unsatisfiable"),
    ({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
     "recursive"),
    ({"enum": [f"value{i}" for i in range(30000)]}, "larger than"),
    ({"$ref": "http://example.com/schema.json"}, "not present"),
])
def test_bad_schemas_are_one_line_errors(schema, message):
    tok = chat_tokenizer("char")
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        C.compile_json_grammar(tok, schema if isinstance(schema, str) else json.dumps(schema), "response_format")
    assert time.perf_counter() - start < 5
    assert message in str(e.value) and str(e.value).startswith("response_format: ")
    assert "\n" not in str(e.value)


def test_without_llguidance_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(UserError, match=r"pip install 'gptforge\[serve\]'"):
        C.compile_json_grammar(chat_tokenizer("char"), None)


def test_schema_given_as_a_dict_is_stored_as_text():
    config = SamplingConfig(json_schema={"type": "object"})
    assert config.json_schema == '{"type": "object"}' and config.constrained
    assert hash(config) == hash(SamplingConfig(json_schema='{"type": "object"}'))


# ---- the commands ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(0, 512)), block_size=512)
    directory = tmp_path_factory.mktemp("constrained")
    (directory / "schema.json").write_text(json.dumps(SCHEMA))
    (directory / "bad.json").write_text(json.dumps({"type": "object", "not": {}}))
    return save_chat_checkpoint(directory / "ckpt", model, tok), directory


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=cwd)


def test_chat_and_sample_commands_write_valid_json(checkpoint):
    ckpt, directory = checkpoint
    chat = _cli("chat", "--model", ckpt, "-p", "hi", "--json-schema", "schema.json", "--seed", "1", cwd=directory)
    assert chat.returncode == 0, chat.stderr
    jsonschema.validate(json.loads(chat.stdout), SCHEMA)
    chat = _cli("chat", "--model", ckpt, "-p", "hi", "--json", "--seed", "1", "--max-new-tokens", "60",
                cwd=directory)
    assert chat.returncode == 0 and chat.stdout.startswith("{"), chat.stderr
    sample = _cli("sample", "--model", ckpt, "hi", "--json-schema", "schema.json", "--json", "--seed", "2",
                  "--num-samples", "3", "--max-new-tokens", "300", cwd=directory)
    assert sample.returncode == 0, sample.stderr
    for s in json.loads(sample.stdout)["samples"]:
        assert s["finish_reason"] == "stop"
        jsonschema.validate(json.loads(s["text"]), SCHEMA)


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "missing.json"], "--json-schema missing.json: no such file"),
    (["--json-schema", "bad.json"], "--json-schema bad.json: unsupported or invalid schema"),
    (["--json-schema", "schema.json", "--json-object"], "not both"),
])
def test_bad_schema_options_exit_2_with_one_line(checkpoint, args, message):
    ckpt, directory = checkpoint
    proc = _cli("sample", "--model", ckpt, "hi", *args, cwd=directory)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


# ---- a small trained chat model ----------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "temp": {"type": "integer", "minimum": -40, "maximum": 50},
                                            "sky": {"enum": ["sunny", "cloudy", "rain"]},
                                            "wind": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
           "required": ["city", "temp", "sky", "wind"], "additionalProperties": False}
CITIES = ["paris", "rome", "oslo", "lima", "kyiv", "cairo", "quito", "delhi"]


@pytest.fixture(scope="module")
def weather_model():
    """A chat model trained (briefly: ~120 steps) to answer "weather in CITY?" with a JSON record, so its
    free replies are JSON-like but often invalid, as a small model's are."""
    import random

    from gptforge.chat.tokens import encode_chat
    tok = chat_tokenizer("char")
    rng = random.Random(0)
    data = []
    for _ in range(400):
        city = rng.choice(CITIES)
        reply = json.dumps({"city": city, "temp": rng.randint(-5, 35), "sky": rng.choice(["sunny", "cloudy", "rain"]),
                            "wind": [round(rng.uniform(0, 9), 1) for _ in range(rng.randint(0, 3))]})
        data.append(encode_chat(tok, [{"role": "user", "content": f"weather in {city}?"},
                                      {"role": "assistant", "content": reply}]))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=48))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        batch = rng.sample(data, 12)
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), tok.eot_id)
        y = torch.full((len(batch), width), -100)
        for i, (ids, mask) in enumerate(batch):
            ids, trained = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            x[i, :len(ids)] = ids
            y[i, :len(ids) - 1] = torch.where(trained[1:], ids[1:], -100)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def test_fifty_replies_of_a_trained_chat_model_validate(weather_model):
    from gptforge.chat.tokens import encode_chat_prompt, reply_end_ids
    model, tok = weather_model
    prompt = encode_chat_prompt(tok, [{"role": "user", "content": "weather in rome?"}])
    config = SamplingConfig(temperature=0.7, max_new_tokens=120, json_schema=WEATHER)
    engine = TokenGenerator(model, [prompt] * 50, [config] * 50, list(range(50)), eot_id=reply_end_ids(tok),
                            tokenizer=tok)
    tokens, reasons = [[] for _ in range(50)], [None] * 50
    for step in engine:
        for e in step:
            if e.finish_reason is None or e.token not in reply_end_ids(tok):
                tokens[e.index].append(e.token)
            reasons[e.index] = e.finish_reason or reasons[e.index]
    assert reasons == ["stop"] * 50
    replies = [json.loads(tok.decode(t)) for t in tokens]
    for reply in replies:
        jsonschema.validate(reply, WEATHER)
    # the model's own answers, kept inside the grammar (not arbitrary strings the grammar would also allow)
    assert sum(r["city"] in CITIES for r in replies) >= 30  # 36 of 50 here; a random model: none
