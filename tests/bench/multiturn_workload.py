"""The multi-turn chat workload of issue 14, generated deterministically (stdlib only, no server).

16 conversations x 12 turns. Every conversation starts with the same system prompt (~200 tokens with
the SmolLM2 tokenizer); each user message is ~60 tokens of varied English-like text, sampled from a
fixed word list with a fixed seed, so every system and every run sends exactly the same text. Replies
are capped at `REPLY_MAX_TOKENS` (64) new tokens and are generated greedily by the system under test:
the history a turn resends contains the replies that system really gave.

Order turns are sent in (`send_order`): turn-major, i.e. all conversations' turn 1, then all turn 2, ...,
and a conversation's turn t+1 is sent only after its turn-t reply has arrived. A driver keeps up to
`concurrency` turns in flight (default `CONCURRENCY`: every conversation is a user chatting at once);
with concurrency 1 the turns go one at a time, round robin over the conversations. Either way the
conversations are interleaved, so a server that only remembers its last request cannot reuse a history.

Stateless servers (OpenAI `/v1/chat/completions`) get the whole history every turn: `history()` builds
it. Token counts are estimates made without a tokenizer (words + punctuation, calibrated on SmolLM2's
tokenizer: see `token_counts` to measure them with a real one).

    from tests.bench.multiturn_workload import workload, send_order, history
    convs = workload()
    for c, t in send_order(convs):   # (conversation index, turn index from 0)
        msgs = history(convs[c], t, replies[c])  # replies[c]: that conversation's replies so far
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

N_CONVERSATIONS = 16
TURNS = 12
USER_TOKENS = 60  # target length of a user message (SmolLM2 tokens, approximate)
SYSTEM_TOKENS = 200  # target length of the shared system prompt (SmolLM2 tokens, approximate)
REPLY_MAX_TOKENS = 64  # max_tokens of every reply
CONCURRENCY = N_CONVERSATIONS  # turns in flight at once by default: every conversation is an active user
SEED = 14  # issue 14

# Common short words: with SmolLM2's tokenizer nearly every one is a single token after a space, which
# is what makes the word-count estimate below close (measured: see token_counts).
_WORDS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
river garden window kitchen train letter music picture market island bridge forest mountain village road
coffee dinner paper table chair light street doctor weather summer winter spring autumn animal bird dog
good new first last long great little own other old right big high different small large next early
young important few public bad same able quiet warm cold bright dark simple clear careful happy strong
make know take see come think look want give use find tell ask seem feel try leave call keep let begin
show hear play run move live believe bring happen write provide sit stand lose pay meet include learn
""".split()
_OPENERS = ["Tell me", "Can you explain", "I wonder", "Please describe", "Yesterday I read", "My friend said",
            "I think", "Could you compare", "Imagine", "Why do"]
_CONNECT = ["and", "but", "because", "so", "while", "when", "if", "although", "then", "with", "about", "for"]
_SYSTEM_HEAD = (
    "You are a patient and friendly assistant in a long conversation. Answer briefly and stay on the topic "
    "the user chose. Remember what was said earlier in the conversation and refer back to it when it helps."
)


@dataclass(frozen=True)
class Conversation:
    """One conversation: the shared system prompt and its user messages, one per turn."""

    system: str
    user_messages: tuple[str, ...]


def _sentence(rng: random.Random) -> str:
    """One sentence of 7-14 words: an opener, words, a connective now and then, a period or a question mark."""
    words = rng.choice(_OPENERS).split()
    for _ in range(rng.randint(5, 11)):
        words.append(rng.choice(_CONNECT) if rng.random() < 0.15 else rng.choice(_WORDS))
    return " ".join(words) + rng.choice(".?")


def estimate_tokens(text: str) -> int:
    """SmolLM2 tokens of `text`, estimated without a tokenizer: one per word, one per sentence end."""
    return len(text.split()) + sum(text.count(p) for p in ".?!,")


def _text(rng: random.Random, target: int, head: str = "") -> str:
    """Sentences appended to `head` while that brings the estimate closer to `target` tokens (so the
    lengths centre on the target instead of always overshooting it)."""
    text = head
    while True:
        longer = f"{text} {_sentence(rng)}".strip()
        if text and estimate_tokens(longer) - target > target - estimate_tokens(text):
            return text
        text = longer


def workload(n_conversations: int = N_CONVERSATIONS, turns: int = TURNS, seed: int = SEED) -> list[Conversation]:
    """The conversations: the same for a given (n_conversations, turns, seed), in any process or Python.

    Conversation i's messages come from their own random stream (seeded with (seed, i)), so the first
    conversations do not change when more are asked for.
    """
    system = _text(random.Random(f"{seed}-system"), SYSTEM_TOKENS, _SYSTEM_HEAD)
    out = []
    for i in range(n_conversations):
        rng = random.Random(f"{seed}-conversation-{i}")
        out.append(Conversation(system, tuple(_text(rng, USER_TOKENS) for _ in range(turns))))
    return out


def send_order(conversations: Sequence[Conversation]) -> Iterator[tuple[int, int]]:
    """(conversation index, turn index from 0) in the order turns are sent: turn-major, conversations in
    index order within a turn. A driver must also wait for a conversation's previous reply."""
    turns = max((len(c.user_messages) for c in conversations), default=0)
    for t in range(turns):
        for i, c in enumerate(conversations):
            if t < len(c.user_messages):
                yield i, t


def history(conv: Conversation, turn: int, replies: Sequence[str]) -> list[dict[str, str]]:
    """The OpenAI `messages` for `turn` (from 0) of a stateless request: system, then each earlier user
    message with the reply the server gave to it, then this turn's user message."""
    if len(replies) < turn:
        raise ValueError(f"turn {turn} needs {turn} earlier replies, got {len(replies)}")
    msgs = [{"role": "system", "content": conv.system}]
    for t in range(turn):
        msgs.append({"role": "user", "content": conv.user_messages[t]})
        msgs.append({"role": "assistant", "content": replies[t]})
    msgs.append({"role": "user", "content": conv.user_messages[turn]})
    return msgs


def token_counts(conversations: Sequence[Conversation], tokenizer: Any) -> dict[str, Any]:
    """Real token counts with a transformers tokenizer (no special tokens): the system prompt's, and the
    user messages' min / mean / max."""
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    users = [n(m) for c in conversations for m in c.user_messages]
    return {
        "system_tokens": n(conversations[0].system) if conversations else 0,
        "user_tokens_min": min(users, default=0),
        "user_tokens_mean": round(sum(users) / len(users), 1) if users else 0.0,
        "user_tokens_max": max(users, default=0),
    }


def describe(n_conversations: int = N_CONVERSATIONS, turns: int = TURNS, seed: int = SEED) -> dict[str, Any]:
    """The workload's parameters, for a report."""
    return {
        "conversations": n_conversations,
        "turns": turns,
        "seed": seed,
        "user_tokens_target": USER_TOKENS,
        "system_tokens_target": SYSTEM_TOKENS,
        "reply_max_tokens": REPLY_MAX_TOKENS,
        "order": "turn-major; a conversation's next turn after its previous reply",
    }
