"""Command-line tools: tokenizer and data preparation, sweeps, evaluation, benchmarks, AOT fits, TPU launch."""
