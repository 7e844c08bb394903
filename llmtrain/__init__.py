"""llmtrain: pretrain decoder-only language models with DeepSpeed, from raw text to Hugging Face."""

__version__ = "0.1.0"
