"""The compiled decode step (prepare_for_decoding(model, compile=True), sample/chat --compile): the logits of
every step against the eager static-cache step, one compile for every capacity and step (band rings
included), rows independent of their neighbours, quantized products compiled too, and the CLI's compile,
errors and device rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from chat_models import chat_tokenizer, random_chat_model, save_chat_checkpoint

from gptforge.cli import main
from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.generation import KVCache, SamplingConfig, generate_ids, generate_text, prepare_for_decoding
from gptforge.generation.compiled import CompiledDecoder, compiled_decoder
from gptforge.loading import load_model
from gptforge.model import GPT

GREEDY = SamplingConfig(temperature=0.0, stop_at_eot=False)


def band_model(n_embd: int = 32, seed: int = 0) -> GPT:
    """GPT-3 style (dense and band layers alternating: a band layer's cache is a ring), large random weights
    so greedy decoding does not collapse onto one id."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=n_embd,
                         attention="alternating", window=6)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    return model.eval()


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def step_logits(model: GPT, prompt: list[int], steps: int, capacity: int, decode) -> list[torch.Tensor]:
    """Greedy decoding on a static cache: the logits of each decode step, computed by `decode(tokens, cache)`.
    `prompt`: one row's ids, or a list of rows of one length."""
    rows = prompt if isinstance(prompt[0], list) else [prompt]
    with torch.inference_mode():
        cache = KVCache(model.config, [0] * len(rows), capacity, static=True)
        logits = model.head(model.hidden_states(torch.tensor(rows), kv_cache=cache)[:, -1])
        out = []
        for _ in range(steps):
            logits = decode(logits.argmax(-1).view(-1, 1), cache)
            out.append(logits.clone())
        return out


def eager_decode(model: GPT):
    return lambda tokens, cache: model.head(model.hidden_states(tokens, kv_cache=cache)[:, -1])


def test_compiled_steps_equal_eager_steps_and_one_compile_serves_every_capacity():
    """Every step's logits equal the eager static step's to fp32 rounding, over a ring that wraps (window 6,
    20 steps); generations of other capacities and prompt lengths reuse the compiled graphs: the warm-up's and
    one more for a full ring (whose filled slots are its whole buffer; dense buffers have a spare slot, so
    theirs never are)."""
    eager = band_model()
    compiled = prepare_for_decoding(copy.deepcopy(eager), compile=True)
    decoder = compiled_decoder(compiled)
    decoder.warm_up()
    before = graphs_compiled()
    for prompt, steps, capacity in (([5, 6, 7], 20, 23), ([1, 2, 3, 4, 5, 6, 7, 8], 12, 30), ([9], 4, 5)):
        got = step_logits(compiled, prompt, steps, capacity, decoder.decode)
        want = step_logits(eager, prompt, steps, capacity, eager_decode(eager))
        for step, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        assert [int(g.argmax()) for g in got] == [int(w.argmax()) for w in want]
    assert graphs_compiled() == before + 1  # the full ring's
    # TokenGenerator decodes with the attached step: the same tokens as the unprepared model's dynamic cache
    prompt = [[3, 1, 4, 1, 5]]
    assert generate_ids(compiled, prompt, GREEDY.replace(max_new_tokens=15)) == \
        generate_ids(eager, prompt, GREEDY.replace(max_new_tokens=15))
    assert graphs_compiled() == before + 1


def test_each_model_runs_its_own_graph():
    """Two models of the same shapes and other weights: the second compiles its own graph and decodes with its
    own weights. (The step skips dynamo's checks of the modules, so only keeping each decoder's graphs apart
    stops the first model's frozen weights from serving the second.)"""
    first, second = band_model(seed=0), band_model(seed=1)
    want = step_logits(second, [5, 6, 7], 2, 8, eager_decode(second))  # (the ring of 6 does not fill)
    prepare_for_decoding(first, compile=True)
    compiled_decoder(first).warm_up()
    prepare_for_decoding(second, compile=True)
    before = graphs_compiled()
    got = step_logits(second, [5, 6, 7], 2, 8, compiled_decoder(second).decode)
    assert graphs_compiled() == before + 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_row_does_not_depend_on_its_neighbours():
    """In a batch, a row's logits are the same bits whatever the other rows hold. Across batch sizes (one
    compiled graph each, whose autotuner may choose other fp32 kernels) they agree to fp32 rounding."""
    model = prepare_for_decoding(band_model(), compile=True)
    decode = compiled_decoder(model).decode
    row = [3, 1, 4, 1, 5]
    beside_one = step_logits(model, [row, [9, 2, 6, 5, 3]], 8, 16, decode)
    beside_other = step_logits(model, [row, [1, 1, 1, 1, 1]], 8, 16, decode)
    alone = step_logits(model, row, 8, 16, decode)
    for a, b, c in zip(beside_one, beside_other, alone):
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[0], c[0], rtol=1e-5, atol=1e-5)
        assert int(a[0].argmax()) == int(c[0].argmax())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_products_compile_to_the_same_logits(kind):
    """A quantized model's compiled step computes what its eager step does (bf16 products: to bf16 rounding)."""
    eager = prepare_for_decoding(band_model(), quantize=kind)
    compiled = prepare_for_decoding(copy.deepcopy(eager), compile=True)
    got = step_logits(compiled, [5, 6, 7], 10, 16, compiled_decoder(compiled).decode)
    want = step_logits(eager, [5, 6, 7], 10, 16, eager_decode(eager))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * float(w.abs().max()))


def test_sample_and_chat_compile_before_the_first_prompt(tiny_run, tmp_path, capsys):
    argv = ["sample", "--model", str(tiny_run), "hello", "--max-new-tokens", "12", "--temperature", "0",
            "--seed", "1", "--no-stop-at-eot", "--json"]
    assert main([*argv, "--compile"]) == 0
    captured = capsys.readouterr()
    assert "compiling the decode step" in captured.err and "compiled in" in captured.err
    model, tokenizer = load_model(str(tiny_run))
    config = GREEDY.replace(max_new_tokens=12)
    assert json.loads(captured.out)["samples"][0]["text"] == generate_text(model, tokenizer, ["hello"], config,
                                                                           seed=1)[0]
    tok = chat_tokenizer()
    spec = save_chat_checkpoint(tmp_path / "chat", random_chat_model(tok, end_at=30), tok)
    assert main(["chat", "--model", spec, "-p", "hi", "--max-new-tokens", "4", "--compile"]) == 0
    assert "compiled in" in capsys.readouterr().err


def test_a_compile_that_fails_is_one_line():
    """No working C++ compiler: one line that says what --compile needs, exit code 2."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import fresh_cache

    decoder = CompiledDecoder(band_model())
    with (inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), fresh_cache(),  # nothing cached to reuse
          pytest.raises(UserError) as raised):
        decoder.warm_up()
    message = str(raised.value)
    assert message.startswith("--compile: torch.compile could not build the decode step (")
    assert "C++ compiler" in message and "\n" not in message


def test_compile_off_the_cpu_is_refused(capsys, monkeypatch):
    import gptforge.devices

    monkeypatch.setattr(gptforge.devices, "resolve_device", lambda name: torch.device("cuda"))
    assert main(["sample", "--model", "char-small", "hi", "--compile", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile: the compiled decode step runs on CPU only" in err[0]
    with pytest.raises(UserError, match="for the CPU"):
        CompiledDecoder(band_model().to("meta"))
