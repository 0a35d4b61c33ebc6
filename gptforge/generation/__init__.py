"""Text generation: KV cache, logits processors, batched sampling, streaming.

The public API (the package itself, so `gptforge.generate` stays the function, never a module):

    from gptforge.generation import SamplingConfig, generate, generate_text, generate_ids
    texts = generate_text(model, tokenizer, ["Once upon a time"], SamplingConfig(temperature=0.8, top_p=0.95),
                          num_samples=4, seed=0)
    for event in generate(model, tokenizer, "Hello", SamplingConfig(max_new_tokens=50)):
        print(event.text, end="", flush=True)
"""

from .api import GenerationEvent, encode_prompts, generate, generate_text
from .engine import TokenEvent, TokenGenerator, generate_ids
from .kv_cache import KVCache
from .layout import prepare_for_decoding
from .sampling import SamplingConfig

__all__ = ["GenerationEvent", "KVCache", "SamplingConfig", "TokenEvent", "TokenGenerator", "encode_prompts",
           "generate", "generate_ids", "generate_text", "prepare_for_decoding"]
