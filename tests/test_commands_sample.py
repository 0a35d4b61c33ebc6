"""`gptforge sample` as a command: the seed it used is recorded and repeats the text, --stop takes backslash
escapes, and the weights sampled from are named in --json output (as `eval --json` names them)."""

from __future__ import annotations

import json

import pytest

from gptforge.cli import main
from gptforge.commands.sample import unescape
from gptforge.errors import UserError


def sample_json(capsys, *argv: str) -> dict:
    assert main(["sample", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_records_the_seed_used_and_the_checkpoint(tiny_run, capsys):
    common = ["--model", str(tiny_run), "hello", "--max-new-tokens", "12", "--temperature", "1.5",
              "--no-stop-at-eot"]
    first = sample_json(capsys, *common)
    seed = first["samples"][0]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    again = sample_json(capsys, *common, "--seed", str(seed))
    assert again["samples"][0]["text"] == first["samples"][0]["text"]
    assert first["checkpoint"] == str(tiny_run / "checkpoints" / "step_200")  # step_300 is damaged
    assert (first["step"], first["tokens"]) == (200, 102_400)
    sums = json.loads((tiny_run / "checkpoints" / "step_200" / "checksums.json").read_text())
    assert first["weights_sha256"] == sums["model.safetensors"]
    other_seeds = {sample_json(capsys, *common)["samples"][0]["seed"] for _ in range(3)}
    assert len(other_seeds | {seed}) > 1  # a fresh seed each time, not a constant


def test_eval_json_records_the_checkpoint_it_scored(tiny_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, the quick brown fox " * 8)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_run), "--task", "val", "--data", str(text), "--json", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["checkpoint"] == str(tiny_run / "checkpoints" / "step_200") and doc["step"] == 200
    assert doc["weights_sha256"] == json.loads(
        (tiny_run / "checkpoints" / "step_200" / "checksums.json").read_text())["model.safetensors"]


@pytest.mark.parametrize("given, meant", [
    (r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\r\n", "\r\n"), (r"\\n", "\\n"), (r"x\\", "x\\"),
    (r"\x41\u00e9\U0001F600", "A\u00e9\U0001F600"), ("plain é", "plain é"), ("", ""),
])
def test_unescape_by_hand(given, meant):
    assert unescape(given, "--stop") == meant


@pytest.mark.parametrize("given, needle", [
    (r"\q", r"unknown escape \q"), ("end\\", "a lone backslash at the end"), (r"\x4", r"\x needs exactly 2"),
    (r"\u12", r"\u needs exactly 4"), (r"\ud800", "is not a character"), (r"\U00110000", "is not a character"),
])
def test_unescape_refuses_what_is_not_an_escape(given, needle):
    with pytest.raises(UserError, match="^--stop '") as info:
        unescape(given, "--stop")
    assert needle in str(info.value)


def test_stop_reaches_generation_unescaped(tiny_run, capsys, monkeypatch):
    import gptforge.generation as generation
    seen = []

    def fake_generate(model, tokenizer, prompt, config, **kwargs):
        seen.append(config.stop)
        return iter(())
    monkeypatch.setattr(generation, "generate", fake_generate)
    assert main(["sample", "--model", str(tiny_run), "hi", "--stop", r"\n\n", "--stop", "END", "--device", "cpu"]) == 0
    assert seen == [("\n\n", "END")]


def test_a_preset_with_a_seed_gives_the_same_text_every_run(gpt2_ranks, capsys):
    """A preset's weights are random: --seed must cover them too, not only the sampling."""
    common = ["--model", "dev-17m", "hello", "--max-new-tokens", "6", "--temperature", "0", "--no-stop-at-eot"]
    first = sample_json(capsys, *common, "--seed", "7")["samples"][0]["text"]
    assert sample_json(capsys, *common, "--seed", "7")["samples"][0]["text"] == first
    assert sample_json(capsys, *common, "--seed", "8")["samples"][0]["text"] != first  # greedy: only the weights differ
