"""Moving models between gptforge and other ecosystems.

`hf` writes and reads Hugging Face transformers directories (GPT-2 layout for dense models, GPT-Neo for
GPT-3-style alternating dense/banded models), `hf_tokenizer` gives each tokenizer kind its transformers
files, `gguf` writes llama.cpp's GGUF. Every exporter refuses a model it cannot represent exactly rather
than writing one that computes different logits.
"""
