"""The HTTP front end: conversation routes, an OpenAI-compatible endpoint, a web chat page, metrics.

    python -m producer.api --redis redis://HOST:6379/0 --port 8000

Everything it knows lives in Redis, so any number of API processes can serve the same deployment.
"""

from producer.api.app import create_app

__all__ = ["create_app"]
