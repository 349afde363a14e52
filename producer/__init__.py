"""Producers: the conversation store in Redis (store.py), the client that enqueues turns and
reads their streams (client.py), the CLI chat (chat.py) and its embedded stack (embedded.py)."""
