"""Which grammar engine gptforge uses for constrained decoding: xgrammar, llguidance or outlines-core, measured.

For each engine and tokenizer (GPT-2's 50,257 ids, a 4,096-id byte-level BPE): the time to compile a JSON
schema (nested objects, arrays, enums, numbers, strings), and the per-token cost of one decoding step --
compute the allowed-token mask, then advance by one token -- along the canonical tokenization of a valid
document. Rounds are interleaved (engine A, B, C, A, B, C, ...) and medians reported, because the machine
this ran on is shared. Only a comparison script: the product uses the engine this picked (llguidance).

    pip install xgrammar outlines-core   # the two not chosen (not gptforge dependencies; xgrammar brings triton)
    python benchmarks/grammar_engines.py --rounds 5

Measured (2 shared cores, OMP_NUM_THREADS=1, medians of 3 interleaved rounds; xgrammar 0.2.9, llguidance 1.9.1,
outlines-core 0.2.14):

    GPT-2 (50,257)   compile    mask+advance      bpe (4,096)   compile   mask+advance
    xgrammar         48.3 ms    0.014 ms/token                  13.7 ms   0.108 ms/token
    llguidance        9.7 ms    0.289 ms/token                   2.0 ms   0.280 ms/token
    outlines-core  7588.5 ms    1.030 ms/token                 324.1 ms   0.144 ms/token

xgrammar's mask is the fastest, but it refuses an escaped quote in a string under `maxLength` (so "name" has
none here), needs transformers and triton (~1 GB) installed, and compiles 5x slower; outlines-core compiles a
schema against GPT-2's vocabulary in seconds and cannot express arbitrary nesting (json_object) as a regex.
llguidance: no dependencies, fuel limits on its own work, ~0.3 ms a token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},  # xgrammar 0.2.9 refuses escapes under maxLength
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada \"the\" Lovelace", "age": 36, "score": -12.5e3, "role": "admin", "tags": ["math", "poetry"],
       "address": {"city": "London", "zip": "W1"}, "active": True}


def token_bytes(tok) -> list[bytes]:
    specials = set(tok.special_tokens.values())
    return [b"" if i in specials else tok.decode_bytes([i]) for i in range(tok.vocab_size)]


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo(token_bytes(tok), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=[tok.eot_id])
        self.vocab = tok.vocab_size

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def run(self, compiled, tokens):
        m = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        for t in tokens:
            m.fill_next_token_bitmask(mask)
            assert m.accept_token(t), t


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance as llg
        import llguidance.torch as lt
        self.llg, self.lt = llg, lt
        ids = token_bytes(tok)

        class Wrapped:
            eos_token_id = tok.eot_id
            bos_token_id = None
            tokens = ids
            special_token_ids = list(tok.special_tokens.values())

            def __call__(self, s):
                return tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)

        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()))
        self.vocab = tok.vocab_size

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.llg.LLMatcher(self.tokenizer, grammar)  # llguidance compiles lazily: build one matcher
        assert not m.is_error(), m.get_error()
        return grammar

    def run(self, grammar, tokens):
        m = self.llg.LLMatcher(self.tokenizer, grammar)
        mask = self.lt.allocate_token_bitmask(1, self.vocab)
        for t in tokens:
            self.lt.fill_next_token_bitmask(m, mask, 0)
            assert m.consume_token(t), (t, m.get_error())


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core as oc
        self.oc = oc
        specials = set(tok.special_tokens.values())
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if i not in specials:
                table.setdefault(b, []).append(i)
        self.vocabulary = oc.Vocabulary(tok.eot_id, table)
        self.vocab = tok.vocab_size

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def run(self, index, tokens):
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
        guide = self.oc.Guide(index)
        mask = allocate_token_bitmask(self.vocab)
        for t in tokens:
            fill_next_token_bitmask(guide, mask)
            guide.advance(t)


def bpe_4096():
    from pathlib import Path
    import sysconfig
    from gptforge.tokenizer import train_bpe
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    return train_bpe((f.read_text(errors="replace") for f in files), vocab_size=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from gptforge.tokenizer import GPT2Tokenizer
    text = json.dumps(DOC)
    for label, tok in (("gpt2 (50,257)", GPT2Tokenizer()), ("bpe (4,096)", bpe_4096())):
        tokens = tok.encode(text)
        engines = [cls(tok) for cls in (XGrammar, LLGuidance, OutlinesCore)]
        compile_s = {e.name: [] for e in engines}
        step_ms = {e.name: [] for e in engines}
        for _ in range(args.rounds):
            for e in engines:
                t0 = time.perf_counter()
                compiled = e.compile(SCHEMA)
                t1 = time.perf_counter()
                e.run(compiled, tokens)
                t2 = time.perf_counter()
                compile_s[e.name].append(t1 - t0)
                step_ms[e.name].append((t2 - t1) * 1e3 / len(tokens))
        print(f"{label}: {len(tokens)} tokens of {len(text)} bytes; medians of {args.rounds} interleaved rounds")
        for e in engines:
            print(f"  {e.name:14s} compile {statistics.median(compile_s[e.name]) * 1e3:9.1f} ms   "
                  f"mask+advance {statistics.median(step_ms[e.name]):7.3f} ms/token "
                  f"(min {min(step_ms[e.name]):.3f})")


if __name__ == "__main__":
    main()
