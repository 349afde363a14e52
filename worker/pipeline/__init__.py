"""Model pipelines: loading (loader.py), tokenizer wrapper (codec.py), device backends."""
