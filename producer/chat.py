"""The chat loop of the original notebook, as a command.

    python -m producer.chat                       # embedded: fakeredis + an in-process worker, offline
    python -m producer.chat --redis redis://host:6379/0 --model oasst-pythia-12b

`Prompter:` reads a line; an empty line ends the chat. EXAMPLE_PROMPTS (a JSON list) replaces
typed input and echoes `Prompter: AUTO <text>`. Replies stream as they are generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator

from config.settings import ConfigError, load_settings
from producer.client import ChatClient, StreamEvent
from shared.errors import ChatError
from shared.sampling import SamplingParams


def prompts() -> Iterator[str]:
    auto = os.environ.get("EXAMPLE_PROMPTS")
    if auto is not None:
        items = json.loads(auto)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise SystemExit("EXAMPLE_PROMPTS must be a JSON list of strings")
        for text in items:
            print(f"Prompter: AUTO {text}", flush=True)
            yield text
        return
    while True:
        try:
            yield input("Prompter: ")
        except EOFError:
            return


def printer() -> object:
    shown = {"attempt": 0}

    def on_event(ev: StreamEvent) -> None:
        if ev.kind == "start":
            if shown["attempt"]:
                print("\n[the worker was replaced; the reply restarts]\nAssistant: ", end="", flush=True)
            shown["attempt"] = ev.attempt
        elif ev.kind == "delta":
            print(ev.text, end="", flush=True)

    return on_event


def chat(client: ChatClient, model: str, system: str | None, sampling: SamplingParams) -> int:
    cid = client.create_conversation(model, system)
    for text in prompts():
        if not text.strip():
            break
        print("Assistant: ", end="", flush=True)
        try:
            result = client.ask(cid, text, sampling, on_event=printer())  # type: ignore[arg-type]
        except ChatError as e:
            print(f"\n[error] {e}", flush=True)
            continue
        note = "" if not result.dropped_messages else f" [{result.dropped_messages} oldest messages left out]"
        print(note, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m producer.chat", description="Chat with a model served by the pool.")
    ap.add_argument("--redis", help="Redis URL of a deployment; default: an embedded fakeredis + worker")
    ap.add_argument("--model", default=None, help="model preset (default: smollm2-135m)")
    ap.add_argument("--device", default=None, help="embedded worker's device preset (default: cpu)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = always the most likely token (default)")
    ap.add_argument("--top-k", type=int, default=5, help="0 = off (default 5)")
    ap.add_argument("--output-length", type=int, default=None, help="max new tokens (default: until the end key)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # INFO logs stay out of the chat display
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, output_length=args.output_length)
    except ValueError as e:
        print(f"invalid option: {e}", file=sys.stderr)
        return 2
    over = {k: v for k, v in {"model": args.model, "device": args.device}.items() if v}
    try:
        if args.redis:
            settings = load_settings(redis_url=args.redis, **over)
            client = ChatClient(settings)
            return chat(client, settings.model, args.system, sampling)
        from producer.embedded import EmbeddedStack

        _quiet_loading()
        print(f"Loading {over.get('model', 'smollm2-135m')} (embedded fakeredis + worker)...", file=sys.stderr)
        with EmbeddedStack(**over) as stack:
            client = ChatClient(stack.settings)
            try:
                return chat(client, stack.settings.model, args.system, sampling)
            finally:
                client.close()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _quiet_loading() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
