"""The wire between producers and workers: pydantic models, prompt templates, Redis key layout."""
