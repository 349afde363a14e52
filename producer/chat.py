"""The chat loop of the original notebook, as a command.

    python -m producer.chat                       # embedded: fakeredis + an in-process worker, offline
    python -m producer.chat --redis redis://host:6379/0 --model oasst-pythia-12b

`Prompter:` reads a line (with line editing and history on a terminal); an empty line, Ctrl-D or Ctrl-C
at the prompt ends the chat. Ctrl-C during a reply cancels that turn (the worker stops at its next step)
and returns to the prompt. EXAMPLE_PROMPTS (a JSON list) replaces typed input and echoes
`Prompter: AUTO <text>`. Replies stream as they are generated; a reply that stopped for any reason
but its end key says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator

from config.quiet import no_progress_bars
from config.settings import ConfigError, load_settings
from producer.client import ChatClient
from producer.reader import Append, Done, Error, ReplyAssembler, Restart
from shared.errors import ChatError
from shared.sampling import SamplingParams
from shared.wire import FinishReason, TurnResult

DEFAULT_MAX_TOKENS = 512  # tokens: a greedy reply that loops stops here rather than filling the context
NOTES = {FinishReason.length: "stopped at the output length", FinishReason.stop: "stopped at a stop string",
         FinishReason.cancelled: "cancelled"}


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
    read = input
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession  # line editing (arrows, Ctrl-A/E...) and history (Up)

        read = PromptSession().prompt
    while True:
        try:
            yield read("Prompter: ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave cleanly
            print(flush=True)
            return


class Reply:
    """One turn's reply on the terminal: printed as it streams, restarts and interruptions included."""

    def __init__(self, client: ChatClient, turn_id: str):
        self.client, self.turn_id = client, turn_id
        self.asm = ReplyAssembler()
        self.last = "0-0"  # the last stream entry read: following again (after a Ctrl-C) goes on from there

    def follow(self) -> TurnResult | None:
        """Print until the turn ends; the result, or None after an error (printed)."""
        for ev in self.client.events(self.turn_id, after=self.last):
            self.last = ev.id or self.last
            for up in self.asm.feed(ev):
                if isinstance(up, Append):
                    print(up.text, end="", flush=True)
                elif isinstance(up, Restart):
                    print(f"\n[the worker was lost; the reply restarts]\nAssistant: {up.text}", end="", flush=True)
                elif isinstance(up, Done):
                    print(up.tail, end="", flush=True)
                    return up.result
                elif isinstance(up, Error):
                    print(f"\n[error] {up.message}", flush=True)
                    return None
        return None


def turn(client: ChatClient, cid: str, text: str, sampling: SamplingParams) -> None:
    started = client.send(cid, text, sampling)
    print("Assistant: ", end="", flush=True)
    reply = Reply(client, started.turn_id)
    try:
        result = reply.follow()
    except KeyboardInterrupt:  # stop this reply, keep the chat: the worker keeps what it generated so far
        if client.cancel(started.turn_id) == "finished":  # it had ended; only the display was behind
            print(" [interrupted: the rest of the reply is not shown, the conversation keeps it whole]", flush=True)
            return
        result = reply.follow()
    if result is None:
        return
    notes = [NOTES[result.finish_reason]] if result.finish_reason in NOTES else []
    if result.dropped_messages:
        notes.append(f"{result.dropped_messages} oldest messages left out")
    if result.truncated_tokens:
        notes.append(f"the start of your message ({result.truncated_tokens} tokens) left out: too long for the context")
    print(f" [{'; '.join(notes)}]" if notes else "", flush=True)


def default_max_tokens(client: ChatClient, model: str) -> int:
    """DEFAULT_MAX_TOKENS, or half the model's sequence length where that is less (a 256-token model
    could never take 512: every turn would be refused)."""
    seq = client.catalog.info(model).sequence_length
    return max(1, min(DEFAULT_MAX_TOKENS, seq // 2)) if seq else DEFAULT_MAX_TOKENS


def chat(client: ChatClient, model: str, system: str | None, sampling: SamplingParams) -> int:
    cid = client.create_conversation(model, system)
    if sampling.max_tokens is None:
        sampling = sampling.model_copy(update={"max_tokens": default_max_tokens(client, model)})
    for text in prompts():
        if not text.strip():
            break
        try:
            turn(client, cid, text, sampling)
        except ChatError as e:
            print(f"[error] {e}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    no_progress_bars()  # the embedded worker's first load converts a GGUF with tqdm (config/quiet.py)
    ap = argparse.ArgumentParser(prog="python -m producer.chat", description="Chat with a model served by the pool.")
    ap.add_argument("--redis",
                    help="Redis URL (or sentinel:// list) of a deployment; default: an embedded fakeredis + worker")
    ap.add_argument("--model", default=None, help="model preset (default: smollm2-135m)")
    ap.add_argument("--device", default=None, help="embedded worker's device preset (default: cpu)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = always the most likely token (default)")
    ap.add_argument("--top-k", type=int, default=5, help="0 = off (default 5)")
    ap.add_argument("--max-tokens", "--output-length", dest="max_tokens", type=int, default=None,
                    help=f"max new tokens per reply (default {DEFAULT_MAX_TOKENS}, or half the model's "
                         "sequence length if that is less)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # INFO logs stay out of the chat display
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
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
        device = load_settings(**over).device_preset()  # a bad name fails here, before any server starts
        slow = " (compiling its 1-row decode step: about a minute on a first start)" if (
            device.compile_decode and device.device == "cpu") else ""
        print(f"Loading {over.get('model', 'smollm2-135m')} on {device.name}{slow} (embedded fakeredis + worker)...",
              file=sys.stderr)
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
    except KeyboardInterrupt:  # while loading or starting: nothing to cancel
        print(file=sys.stderr)
        return 130


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the model loads in this process: its warnings stay out of the chat


if __name__ == "__main__":
    sys.exit(main())
