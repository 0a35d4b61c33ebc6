"""Text generation: KV cache, logits processors, batched sampling, streaming. Public API in gptforge.generate."""
