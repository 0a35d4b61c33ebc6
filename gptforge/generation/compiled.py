"""A decode step compiled by torch.compile (inductor) for the CPU: `prepare_for_decoding(model, compile=True)`,
`sample --compile`, `chat --compile`.

Batch-1 decoding reads every weight once per token, so its speed is how fast the matrix products stream the
weights, plus whatever else a step costs. In eager mode both fall short of llama.cpp on the same weights:
oneDNN's prepacked bf16 product streams at ~19 GB/s at one row where a plain sum over the same bytes reads at
~28, and ~20 small ops per layer (norms, attention, casts, residual adds) and their Python add ~4 ms a token.
Inductor with `freezing` (the weights become constants it lays out once) and `max_autotune` (it times its own
C++ GEMM template against aten's and keeps the faster per shape) fixes both: its generated micro-kernels read
bf16 weights at ~26 GB/s at one row, and the rest of the step becomes a few fused C++ loops. Measured on GPT-2
124M, 2 threads, 2-core AMD EPYC (Zen 4, AVX-512 BF16), batch-1 tokens/s, medians of 5 rounds, eager ->
compiled, and llama.cpp on the same weights in the same runs as the compiled figures (benchmarks/
vs_llama_cpp.py [--compile]; two compiled runs): fp32 37 -> 60-63 (llama.cpp 59), bf16 71 -> 122-126
(123-124), int8 82 -> 227-235 (208-229), int4 129 -> 206-215 (227-236).

What it costs: the compile itself, once per process and per batch size: 37-55 s for GPT-2 on 2 cores, less
when inductor finds its autotuning results on disk from an earlier run (~24 s fp32 and bf16), and less again
where it finds the whole compiled graph there too (~10 s int8 and int4; an fp32 or bf16 graph holds oneDNN
weight tensors inductor cannot store, so it is compiled again in each process); and one more copy of the
linear weights (inductor's frozen constants). So it is opt-in, for sessions long enough to repay it (a chat, a
long sample). The autotuner's timings decide the kernels, and its choices are kept on disk: a compile on a
machine busy with other work can keep slower ones.

How it stays one compile per batch size: the decode step runs on a static KVCache (fixed shapes, the slot is a
device tensor), inside a `_StepView` that hands the model only tensors, never a Python number that changes per
step; the buffers' slot dimension and the number of filled slots (the size of a tensor) are marked dynamic, so
every capacity and every step reuse the same code, which attends over the filled slots only. (A band layer's
ring compiles once more, when it first fills.) The prefill stays eager: prepacked products already beat
llama.cpp at prompt lengths.

Batch invariance: within one batch a row's logits are the same bits whatever its neighbours hold (tested). Each
batch size is its own graph, and the autotuner may pick other fp32 kernels for it, so between batch sizes fp32
logits agree to float rounding (~1e-5), not bit for bit; bf16 measured bit for bit at 1, 2 and 3 rows.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from ..errors import UserError
from ..model import GPT
from .kv_cache import KVCache

#: inductor settings of the compiled step (set only while it runs)
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "max_autotune_report_choices_stats": False}
_ATTRIBUTE = "compiled_decoder"  # where prepare_for_decoding(compile=True) keeps a model's CompiledDecoder
#: compiled graphs one decoder keeps (one per batch size, and a band ring's second) before running uncompiled
RECOMPILE_LIMIT = 64
#: slots of the cache the warm-up compiles on; any capacity then reuses the code (the dimension is dynamic)
WARM_UP_CAPACITY = 4


class _StepView:
    """What the model sees of a static KVCache inside the compiled step (its `start_step`/`update`/`advance`):
    this step's positions, computed before the call, and the cache's static update, cut to the slots filled so
    far. Python numbers that change per step (the step counter, how many slots are filled) never reach the
    compiled code, since each one would be a new compile: the filled length travels as the size of a tensor
    (`spans`, one per attention window, marked dynamic), so the step attends over what is filled, not the
    whole buffer (a chat's cache is sized for its longest reply)."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, spans: dict[int | None, torch.Tensor]) -> None:
        self.cache = cache
        self.positions = positions
        self.spans = spans

    def start_step(self, T: int) -> torch.Tensor:
        return self.positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values, mask = self.cache.static_update(layer, k, v)
        n = self.spans[self.cache.windows[layer]].size(0)
        return keys[:, :, :n], values[:, :, :n], mask[..., :n]

    def advance(self, T: int) -> None:
        pass


class _DecodeStep(nn.Module):
    """The decode step as a module: (B, 1) ids and a _StepView -> (B, V) next-token logits."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, view: _StepView) -> torch.Tensor:
        x = self.model.hidden_states(tokens, kv_cache=view)  # (B, 1, C)
        return self.model.head(x[:, -1])  # (B, V)


class CompiledDecoder:
    """`model`'s decode step, (B, 1) ids -> (B, V) next-token logits, compiled on first use (or `warm_up`).
    The weights are a snapshot taken at compile time, like prepacked or quantized products: prepare after
    loading, and do not train the model afterwards."""

    def __init__(self, model: GPT) -> None:
        if model.transformer.wte.weight.device.type != "cpu":
            raise UserError("--compile: the compiled decode step is for the CPU (on a GPU, generation "
                            "replays CUDA graphs instead); add --device cpu or leave --compile out")
        self.model = model
        # A module whose parameters are the model's: what freezing turns into constants it lays out once.
        # Its graphs are this decoder's alone (`isolate_recompiles`): every decoder runs the same Python code,
        # and dynamo otherwise keeps one list of graphs per code object, which a process that compiles several
        # models (a benchmark, a notebook) would fill, then silently run the step uncompiled. Being its own
        # also makes it safe to skip dynamo's per-call checks of the model's modules (`guard_filter_fn`): only
        # this model's step can ever reach these graphs, and its weights are frozen into them anyway. For GPT-2
        # dynamo's lookup before each call drops from ~0.37 to ~0.13 ms (profiled), ~5% of an int8 token;
        # the inputs stay checked (shapes, dtypes: a new batch size still compiles its own graph).
        self._compiled = torch.compile(
            _DecodeStep(model), isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        import torch._inductor.config as inductor_config  # (here: it takes ~1 s to import)
        import torch._inductor.select_algorithm as select_algorithm

        # the autotuner writes a table of its timings to stderr for every product (a module flag, not a
        # setting), and warns about a deprecated storage API it calls itself: neither is the user's business
        select_algorithm.PRINT_AUTOTUNE = False
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)

        # set around each call, since compiles happen at calls (the first, and a new batch size): passed as
        # torch.compile(options=...) instead, freezing did not take effect (103 -> 40 tokens/s measured)
        self._inductor_settings = inductor_config.patch(INDUCTOR_OPTIONS)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, (B, 1), after what the static `cache` holds: the next-token logits."""
        if not cache.static:
            raise ValueError("a compiled decode step needs a static KVCache")
        positions = cache.start_step(1)  # checks the capacity; this step's masks, from the device slot
        spans = {window: cache.slot_range(n) for window, n in cache.decode_spans().items()}
        for tensor, dim in (*cache.capacity_dims(), *((span, 0) for span in spans.values())):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)  # one compile for every capacity and step
        try:
            with self._inductor_settings:
                logits = self._compiled(tokens, _StepView(cache, positions, spans))
        except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as e:
            inner = getattr(e, "inner_exception", e)  # (what inductor raised, under dynamo's wrapper)
            lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
            what = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
            raise UserError(f"--compile: torch.compile could not build the decode step ({what[:200]}); "
                            "it needs a working C++ compiler (g++ or clang); install one or leave --compile "
                            "out") from None
        cache.advance(1)
        return logits

    def warm_up(self, batch: int = 1) -> float:
        """Compile the step for `batch` rows now (a throwaway cache, one eager prefill token and one compiled
        step) rather than in the middle of the first reply; the seconds it took."""
        start = time.perf_counter()
        capacity = min(WARM_UP_CAPACITY, self.model.config.block_size)
        weight = self.model.transformer.wte.weight
        # under inference mode, as TokenGenerator makes its caches: a cache made outside it has tensors of
        # another kind, and the first real step would compile again
        with torch.inference_mode():
            cache = KVCache(self.model.config, [0] * batch, capacity, weight.device, weight.dtype, static=True)
            tokens = torch.zeros(batch, 1, dtype=torch.long)
            self.model.hidden_states(tokens, kv_cache=cache)  # eager prefill
            self.decode(tokens, cache)
        return time.perf_counter() - start


def attach_compiled_decoder(model: GPT) -> CompiledDecoder:
    """Give `model` a CompiledDecoder that every TokenGenerator over it then decodes with (sample, chat, the
    generation API); the decoder, not yet compiled."""
    decoder = CompiledDecoder(model)
    setattr(model, _ATTRIBUTE, decoder)
    return decoder


def compiled_decoder(model: GPT) -> CompiledDecoder | None:
    """The CompiledDecoder attached to `model`, or None."""
    return getattr(model, _ATTRIBUTE, None)
