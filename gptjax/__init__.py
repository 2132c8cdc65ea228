"""gptjax: GPT-style language models in JAX/Flax, sharded, resumable, launched by flag."""

__version__ = "0.1.0"
