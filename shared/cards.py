"""What workers publish about themselves, so producers can check a turn before they queue it.

A worker publishes its model's card when it becomes ready (`{p}:model:{model}`, plus the tokenizer's
files under `{p}:tokenizer:{sha}`), and a WorkerReport every few seconds with a TTL
(`{p}:worker:{name}`, indexed by `{p}:live:{model}`): a worker that dies disappears by itself.
Producers (the HTTP API, the CLI, the client library) validate sampling and context fitting against
the card with the same code the worker runs, so every rejection a worker would make for the request's
own sake is made before anything is stored or queued.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from shared.prompts import PromptFormat

LIVENESS_TTL_S = 15  # a worker's report expires this long after its last heartbeat
HEARTBEAT_S = 5.0  # how often a worker renews its report
log = logging.getLogger(__name__)


class ModelCard(BaseModel):
    """The facts about a served model that decide whether a request can be served."""

    model_config = ConfigDict(frozen=True)

    model: str  # the model's name (preset name, hub id or path), as turns and queues name it
    sequence_length: int = Field(ge=1)  # positions per sequence: prompt + output, in tokens
    vocab_size: int = Field(ge=1)  # real tokens (ids below this); top_k may be at most this
    prompt_format: PromptFormat
    end_keys: list[str]  # tokens that end a reply (beside the tokenizer's eos)
    special_tokens: list[str] = Field(default_factory=list)  # never produced from user text
    tokenizer_sha: str  # sha256 of the tokenizer files: key of `{p}:tokenizer:{sha}`


class WorkerReport(BaseModel):
    """One worker's liveness and load, renewed every HEARTBEAT_S seconds."""

    name: str
    model: str
    sequence_length: int
    slots: int  # sequences it runs at once
    busy: int = 0  # slots in use
    host: str = ""
    pid: int = 0
    started_at: float = 0.0  # unix time
    at: float = 0.0  # unix time of this report
    # It consumes its own queue too (cache-aware routing): producers route to it only then, so a producer
    # upgraded before its workers never routes to a queue an older worker does not consume.
    own_queue: bool = False


def read_card(raw: bytes | str | None, model: str) -> ModelCard | None:
    """The card stored for `model`, or None when there is none or it cannot be read (then the caller
    goes on as without one: the worker checks what the card would have; a warning names the key's model)."""
    if not raw:
        return None
    try:
        card = ModelCard.model_validate_json(raw)
    except ValueError as e:
        log.warning("model %r: its stored card is unreadable, ignored (%s)", model, str(e).splitlines()[0])
        return None
    return card if card.model == model else None


def read_reports(raws: list[bytes | str | None]) -> list[WorkerReport]:
    """The worker reports that can be read (an expired one reads as None and is skipped; so is one that
    is not a report, with a warning: whatever is stored, no reader fails on it)."""
    out = []
    for raw in raws:
        if not raw:
            continue
        try:
            out.append(WorkerReport.model_validate_json(raw))
        except ValueError as e:
            log.warning("an unreadable worker report was ignored (%s)", str(e).splitlines()[0])
    return out
