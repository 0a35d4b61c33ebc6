"""Public generation API (implementation in gptforge.generation).

    from gptforge.generate import SamplingConfig, generate, generate_text, generate_ids
    texts = generate_text(model, tokenizer, ["Once upon a time"], SamplingConfig(temperature=0.8, top_p=0.95),
                          num_samples=4, seed=0)
    for event in generate(model, tokenizer, "Hello", SamplingConfig(max_new_tokens=50)):
        print(event.text, end="", flush=True)
"""

from .generation.api import GenerationEvent, encode_prompts, generate, generate_text
from .generation.engine import TokenEvent, TokenGenerator, generate_ids
from .generation.kv_cache import KVCache
from .generation.sampling import SamplingConfig

__all__ = ["GenerationEvent", "KVCache", "SamplingConfig", "TokenEvent", "TokenGenerator", "encode_prompts",
           "generate", "generate_ids", "generate_text"]
