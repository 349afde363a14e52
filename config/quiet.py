"""No progress bars from the libraries a process loads models with.

tqdm reads TQDM_DISABLE when it is imported (transformers' GGUF conversion uses it directly), so a process
calls this first thing, before anything imports it: in a worker Celery would log every refresh of a bar as
a WARNING line, and in the CLI a bar would mix with the chat. Settings the user made are kept.
"""

import os


def no_progress_bars() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
