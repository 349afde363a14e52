"""The engine: one per device, serving up to `slots` sequences at once.

Iteration-level scheduling (Orca / vLLM / text-generation-inference): each loop iteration admits
waiting requests into free slots, prefills at most PREFILL_BUDGET prompt tokens (whole short
prompts, or one chunk of a long one: a 2,000-token prompt never stalls the running streams for its
whole prefill), drops the cancelled and expired, then runs one decode step for every slot that is
decoding. A prefill that completes samples its sequence's first token. Sequences join and leave
between steps; each keeps its own sampling parameters inside the shared batch.

A decoded token's text (detokenizing, its event, the stop-string check) is emitted one step late,
right after the next step is launched: on CUDA, where launching returns before the device is done,
that host work overlaps the device's instead of adding to every step. A stop string found that way
voids the one extra token its sequence got meanwhile.

The engine thread is the only one touching the model. Callers (Celery task threads) `submit` a
prompt and read events from the returned handle.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from shared.codec import Codec
from shared.grammar import GrammarCompiler, first_line
from shared.sampling import SamplingParams
from shared.wire import FinishReason
from worker.engine.detok import Detokenizer
from worker.engine.grammar import Allowed, Matcher, allowed_tokens
from worker.engine.prefix_cache import PrefixCache
from worker.engine.sampling import RowLogprob, Sampler, needs_history
from worker.engine.stopping import StoppingCriteria
from worker.pipeline.backend import PREFILL_CHUNKS, Backend, Copy, Prefill

log = logging.getLogger(__name__)

PREFILL_BUDGET = PREFILL_CHUNKS[-1]  # prompt tokens prefilled per iteration, between decode steps
# How long prompts about to be submitted (Engine.expect / Engine.arriving) may hold back a prefill so they
# join it. Turns that reach a worker together are submitted milliseconds apart (each delivery is popped,
# screened and claimed in turn); prefilling the first alone made the others wait for that whole prefill,
# then another (8 streams over HTTP: TTFT +60 ms over the engine alone).
ARRIVAL_WINDOW_S = 0.04
# Within such a hold, the next delivery of a burst is announced only once the previous one is claimed (the
# consumer pops them one by one, 3-4 ms apart on 2 busy cores): the hold lasts this long past the latest
# announcement, so a gap between two of them does not start the prefill with half the burst.
LINGER_S = 0.008
EXPECT_S = 0.1  # an expected prompt that never comes (its task never ran) stops counting after this


@dataclass
class Token:
    """Event: one sampled token and the text it made stable; token_id -1 for the text flushed at the end."""

    text: str  # newly stable text ('' while a character or stop string is incomplete)
    token_id: int


@dataclass
class Finished:
    """Final event of a sequence that ended: finish_reason, the whole reply text, token counts, and times in
    seconds (prefill_s: prefill start to first token; decode_s: first token to the end)."""

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float
    token_ids: list[int] = field(default_factory=list)  # the reply's ids (end key excluded)
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier sequence (not prefilled)
    logprobs: list[RowLogprob] | None = None  # per reply token (token_ids' order), when its sampling asked


@dataclass
class Failed:
    """Final event of a sequence whose prefill or step raised, or that the engine abandoned (stop, shutdown)."""

    error: str
    abandoned: bool = False  # True: the engine gave it up (shutdown), it should be retried elsewhere


Event = Token | Finished | Failed


def _text_out(seq: _Seq, text: str, token: int) -> None:
    if seq.on_text is not None:
        seq.on_text(text)
    else:
        seq.events.put(Token(text, token))


@dataclass
class _Seq:
    id: int
    prompt: list[int]
    params: SamplingParams
    stopping: StoppingCriteria
    events: queue.SimpleQueue[Event]  # C-implemented: a put per token, cheaper than queue.Queue's Python locks
    detok: Detokenizer
    generator: torch.Generator | None
    # Called on the engine thread with each new piece of text, instead of a Token event: no other thread is
    # woken per token (with 8 streams that was ~300 GIL hand-offs a second taken from the decode loop).
    on_text: Callable[[str], None] | None = None
    matcher: Matcher | None = None  # its grammar's state (grammar.py), when the reply is constrained
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # ... of which reused from an earlier sequence (prefix_cache.py)
    pos: int = 0  # where the last sampled token will be written
    last: int = 0
    pending: int | None = None  # sampled, text not yet emitted (Engine._emit_pending)
    generated: list[int] = field(default_factory=list)
    logprobs: list[RowLogprob] | None = None  # per generated token, when params.logprobs is set
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_first: float = 0.0


class Handle:
    """A submitted request: iterate it for events, cancel it to free its slot at the next step."""

    def __init__(self, seq: _Seq, engine: Engine):
        self._seq = seq
        self._engine = engine

    def cancel(self) -> None:
        """Stop the sequence from any thread: it finishes with finish_reason cancelled at the next step."""
        self._seq.stopping.cancelled = True
        self._engine._wake()

    def __iter__(self):
        while True:
            ev = self._seq.events.get()
            yield ev
            if not isinstance(ev, Token):
                return

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to `timeout` seconds (None: no limit); None if none came in time."""
        try:
            return self._seq.events.get(timeout=timeout)
        except queue.Empty:
            return None


class Engine:
    """Iteration-level scheduler over one Backend (see the module docstring): up to `backend.slots` sequences
    at once, run by one thread. `device` is where seeded sampling generators live."""

    def __init__(self, backend: Backend, codec: Codec, device: str = "cpu"):
        self.backend = backend
        self.codec = codec
        self.device = torch.device(device)
        self.slots: list[_Seq | None] = [None] * backend.slots
        self._waiting: deque[_Seq] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._pending: list[_Seq] = []
        self._thread: threading.Thread | None = None
        self._arriving = 0  # callers between Engine.arriving() and their submit
        self._expected: dict[str, float] = {}  # Engine.expect(): key -> when it stops counting (monotonic)
        self._announced_at = -1e9  # monotonic time of the latest expect() or arriving()
        self._backlog = 0  # deliveries queued behind the latest expected one (expect(behind=)), not yet received
        self._backlog_until = -1e9  # ... counted until then (monotonic)
        self.tokens_generated = 0
        self.finished = 0
        self._sampler = Sampler()  # the decode step's: its row tensors live while the batch does
        # Prefix reuse (prefix_cache.py), where the backend can copy KV rows; the copies placements planned,
        # run on the engine thread before the next prefill.
        self.prefix: PrefixCache | None = None
        if getattr(backend, "prefix_reuse", False):
            self.prefix = PrefixCache(backend.slots, getattr(backend, "spare_slots", 0))
        self._copies: list[Copy] = []

    # -- public ------------------------------------------------------------------------------------
    @property
    def grammars(self) -> GrammarCompiler:
        """Constrained-decoding matchers for this engine's tokenizer (the codec's, built when first used)."""
        return self.codec.grammars

    @property
    def max_len(self) -> int:
        """Positions per slot (the backend's sequence length): prompt and reply tokens together."""
        return self.backend.max_len

    @property
    def busy(self) -> int:
        """Slots holding a sequence now."""
        return sum(s is not None for s in self.slots)

    def start(self) -> Engine:
        """Run the loop on a new thread."""
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        return self

    def bind_thread(self) -> None:
        """Make the calling thread the engine's: stop() joins it from now on."""
        self._thread = threading.current_thread()

    def run(self) -> None:
        """Run the loop on the calling thread until stop() (own_thread.py says why)."""
        self.bind_thread()
        self._run()

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_new: int,
        deadline: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Handle:
        """Queue a prompt (token ids) for generation of at most `max_new` tokens. Its events come through the
        returned Handle: Token per piece of text (unless `on_text` takes the text, on the engine thread; it
        must be quick and never block), then Finished or Failed. Raises ValueError for an empty prompt, one
        that leaves no room, top_k or a logit_bias id beyond the vocabulary, or a grammar this tokenizer cannot
        build."""
        if not prompt:
            raise ValueError("prompt: empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room in sequence length {self.max_len}")
        if max_new < 1:
            raise ValueError("max_new: must be at least 1")
        params.check_vocab(self.codec.vocab_size)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        # What the producer checked too, if it knew this tokenizer; the matcher comes back at the grammar's start.
        matcher = self.grammars.check(params.grammar) if params.grammar is not None else None
        stopping = StoppingCriteria(
            frozenset() if params.ignore_eos else frozenset(self.codec.end_ids),
            min(max_new, self.max_len - len(prompt)),  # the reply never writes past the KV cache
            deadline,
        )
        seq = _Seq(
            next(self._ids),
            list(prompt),
            params,
            stopping,
            queue.SimpleQueue(),
            Detokenizer(self.codec.decode, params.stop),
            gen,
            on_text,
            matcher,
            logprobs=[] if params.logprobs is not None else None,
        )
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is stopped")
            self._waiting.append(seq)
            self._cv.notify()
        return Handle(seq, self)

    @property
    def idle(self) -> bool:
        """No sequence in a slot and none waiting: the next prompt would be prefilled at once."""
        return self.busy == 0 and not self._waiting

    def expect(self, key: str, behind: int = 0) -> None:
        """A prompt is on its way (its delivery was just received): count it as arriving (see `arriving`)
        until `arriving(key)` takes over, or for EXPECT_S at most. `behind`: deliveries still queued after
        it (its queue's length), which count as coming too until they are received (each expect() takes
        one off) or for EXPECT_S."""
        with self._cv:
            now = self._announced_at = time.monotonic()
            if key not in self._expected:
                self._backlog = max(0, self._backlog - 1)
            self._expected[key] = now + EXPECT_S
            if behind:
                self._backlog = max(self._backlog, min(behind, len(self.slots)))
                self._backlog_until = now + EXPECT_S

    @contextlib.contextmanager
    def arriving(self, key: str | None = None) -> Iterator[None]:
        """Announce a prompt that is about to be submitted (its delivery is being claimed and fitted): while
        any is announced or expected, a prefill about to start waits for it, up to ARRIVAL_WINDOW_S, so prompts
        that arrive together are prefilled together. Nothing waits when nothing is announced."""
        with self._cv:
            self._arriving += 1
            self._announced_at = time.monotonic()
            if key is not None:
                self._expected.pop(key, None)
        try:
            yield
        finally:
            with self._cv:
                self._arriving -= 1
                self._cv.notify()

    def abandon_all(self, reason: str = "worker shutting down") -> int:
        """Give up every request (cold shutdown): each gets Failed(abandoned=True). Returns how many."""
        with self._cv:
            seqs = [s for s in self.slots if s is not None] + list(self._waiting)
            self._waiting.clear()
            for s in seqs:
                s.stopping.cancelled = True
                s.events.put(Failed(reason, abandoned=True))
            self.slots = [None] * len(self.slots)
            if self.prefix is not None:
                self.prefix.clear()  # steps may still be writing those rows
            return len(seqs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, fail every request with Failed(abandoned=True) and join the engine thread (up to
        `timeout` seconds) unless called on it. submit() raises RuntimeError from then on."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.abandon_all("engine stopped")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- loop --------------------------------------------------------------------------------------
    def _coming(self) -> bool:
        """Prompts announced or expected (the caller holds _cv)."""
        if self._expected:
            now = time.monotonic()
            self._expected = {k: t for k, t in self._expected.items() if t > now}
        backlog = self._backlog and time.monotonic() < self._backlog_until
        return bool(self._arriving or self._expected or backlog)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and self.busy == 0:
                    self._cv.wait()
                if self._stopping:
                    return
                # Idle, and more prompts a few ms away: let them join this first prefill. (While sequences decode
                # nothing waits: a prompt arriving then joins the next iteration anyway.)
                if self._waiting and self.busy == 0 and self._coming():
                    end = time.monotonic() + ARRIVAL_WINDOW_S
                    while (self._coming() or time.monotonic() - self._announced_at < LINGER_S) and not self._stopping \
                            and len(self._waiting) < len(self.slots) and (left := end - time.monotonic()) > 0:
                        self._cv.wait(min(left, 0.002))
                for i, s in enumerate(self.slots):
                    if s is None and self._waiting:
                        self._place(self._waiting.popleft(), i)
            try:
                self._run_copies()
                self._prefill_some()
                self._reap()
                if any(s is not None and s.prefilled == len(s.prompt) for s in self.slots):
                    self._step()
            except Exception as e:  # a failing step fails its sequences, never the engine
                log.exception("engine step failed")
                for s in [s for s in self.slots if s is not None]:
                    self._finish(s, Failed(f"generation failed: {e}"))

    def _place(self, seq: _Seq, slot: int) -> None:
        """Put a waiting sequence in free decode row `slot` (the caller holds _cv), its prompt's cached prefix
        copied in by _run_copies before anything is prefilled."""
        if self.prefix is not None:
            busy = {i for i, s in enumerate(self.slots) if s is not None}
            placement = self.prefix.place(seq.prompt, slot, busy)
            seq.prefilled = seq.cached = placement.cached
            self._copies += placement.copies
        seq.slot = slot
        self.slots[slot] = seq

    def _run_copies(self) -> None:
        """Run the planned row copies, in order. A copy that fails voids every cached row and sends the
        sequences whose rows it was filling back to a full prefill. Copies only ever write rows no running
        sequence uses (placed ones have prefilled nothing yet), so a sequence already decoding is untouched."""
        if not self._copies:
            return
        copies, self._copies = self._copies, []
        try:
            self.backend.copy_kv(copies)
        except Exception:
            log.exception("copying cached KV failed: prefix cache cleared")
            filled = {c.dst for c in copies}
            with self._cv:
                assert self.prefix is not None
                self.prefix.clear()
                for s in self.slots:
                    if s is not None and s.slot in filled and s.prefilled == s.cached:
                        s.prefilled = s.cached = 0

    def _leave(self, seq: _Seq, trusted: bool) -> None:
        """Record what seq's row holds as it leaves it (the caller holds _cv): positions 0..pos-1 of prompt
        and reply once its prompt is in, else the prefilled part; nothing unless `trusted` (a failed write)."""
        if self.prefix is None:
            return
        if not trusted:
            self.prefix.drop(seq.slot)
            return
        written = seq.pos if seq.prefilled == len(seq.prompt) else seq.prefilled
        self.prefix.store(seq.slot, (seq.prompt + seq.generated)[:written])

    def _prefill_some(self) -> None:
        """Prefill up to PREFILL_BUDGET prompt tokens in one backend call, oldest admissions first:
        prompts arriving together share one forward. Short prompts go whole or wait for the next
        iteration (a split costs a second forward); a long one goes in chunks, alone if need be."""
        budget = PREFILL_BUDGET
        pending = sorted((s for s in self.slots if s is not None and s.prefilled < len(s.prompt)), key=lambda s: s.id)
        batch: list[tuple[_Seq, int]] = []
        for seq in pending:
            if seq.stopping.cancelled:
                continue
            left = len(seq.prompt) - seq.prefilled
            if batch and left > budget:
                continue  # the next iteration takes it first: whole, or its first chunk
            n = min(left, budget)
            budget -= n
            batch.append((seq, n))
            if budget <= 0:
                break
        if batch:
            self._prefill(batch)

    def _prefill(self, batch: list[tuple[_Seq, int]]) -> None:
        now = time.perf_counter()
        for seq, _ in batch:
            if not seq.t_start:
                seq.t_start = now
        chunks = [Prefill(s.slot, s.prompt[s.prefilled : s.prefilled + n], s.prefilled) for s, n in batch]
        try:
            logits = self.backend.prefill(chunks)
        except Exception as e:
            log.exception("prefill failed")
            for seq, _ in batch:
                self._finish(seq, Failed(f"prefill failed: {e}"))
            return
        self._emit_pending()  # while an asynchronous device (CUDA) runs the prefill
        done: list[tuple[int, _Seq]] = []
        for row, (seq, n) in enumerate(batch):
            seq.prefilled += n
            if seq.prefilled == len(seq.prompt):  # else more chunks next iteration; running streams decode in between
                seq.pos = len(seq.prompt)
                done.append((row, seq))
        if not done:
            return
        if self.prefix is not None:  # others may start from these prompts while they run
            with self._cv:
                for _, seq in done:
                    self.prefix.store(seq.slot, list(seq.prompt))
        rows = torch.tensor([row for row, _ in done], device=logits.device)
        seqs = [seq for _, seq in done]
        picked = logits.index_select(0, rows)[:, : self.codec.vocab_size]
        allowed = self._allowed(seqs)
        drawn = Sampler().draw(picked, [s.params for s in seqs], [s.generator for s in seqs],
                               [(s.prompt, ()) for s in seqs], allowed)
        now = time.perf_counter()
        for j, (seq, token) in enumerate(zip(seqs, drawn.tokens)):
            seq.t_first = now
            self._accept(seq, token, lp=drawn.logprobs[j] if drawn.logprobs else None)

    def _step(self) -> None:
        active = [s for s in self.slots if s is not None and s.prefilled == len(s.prompt)]
        n = max(s.slot for s in active) + 1
        ids, pos, mask = [0] * n, [0] * n, [False] * n
        for s in active:  # lists, then one tensor each: per-element tensor writes cost ~3 us apiece
            ids[s.slot], pos[s.slot], mask[s.slot] = s.last, s.pos, True
        logits = self.backend.decode(torch.tensor(ids), torch.tensor(pos), torch.tensor(mask))
        # The previous step's text (detokenizing, events, stop strings) while an asynchronous device
        # runs this one: before anything below copies to the device and so waits for it.
        self._emit_pending()
        rows = torch.tensor([s.slot for s in active], device=logits.device)
        picked = logits.index_select(0, rows)[:, : self.codec.vocab_size]
        # Token histories only matter to penalties: not gathered every step otherwise.
        history = [(s.prompt, s.generated) for s in active] if any(needs_history(s.params) for s in active) else None
        allowed = self._allowed(active)
        drawn = self._sampler.draw(picked, [s.params for s in active], [s.generator for s in active], history,
                                   allowed)
        for j, (s, t) in enumerate(zip(active, drawn.tokens)):
            if self.slots[s.slot] is not s:
                continue  # its previous token completed a stop string while this step ran: this one is void
            s.pos += 1
            self._accept(s, t, defer=True, lp=drawn.logprobs[j] if drawn.logprobs else None)

    def _allowed(self, seqs: list[_Seq]) -> Allowed | None:
        """The constrained rows' masks (grammar.py), or None when no row is constrained (nothing is built)."""
        if all(s.matcher is None for s in seqs):
            return None
        return allowed_tokens([s.matcher for s in seqs], self.grammars)

    def _accept(self, seq: _Seq, token: int, defer: bool = False, lp: RowLogprob | None = None) -> None:
        """Record a sampled token (and its log probability `lp` when the sequence asked); finish the sequence when
        it ends. With `defer`, a token that doesn't end it by id or length leaves its text (and a stop string's
        check) to _emit_pending."""
        self.tokens_generated += 1
        reason = seq.stopping.on_token(token, len(seq.generated) + 1)
        if reason is FinishReason.end_key:
            self._finish(seq, self._result(seq, reason))
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # Nothing was allowed (the sampler left the row unmasked): the grammar asks for a special token's text,
            # or met one of llguidance's limits (GrammarCompiler.check dry-runs only its first steps).
            self._finish(seq, Failed(f"grammar: the reply cannot go on within its grammar "
                                     f"({first_line(seq.matcher.get_error())})"))
            return
        seq.generated.append(token)
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
        seq.last = token
        if seq.matcher is not None and seq.matcher.is_stopped() and reason is None:
            reason = FinishReason.end_key  # the grammar is complete and allows nothing more: as if it ended
        if reason is FinishReason.length or reason is FinishReason.end_key:
            if not self._emit(seq, token):
                self._finish(seq, self._result(seq, reason))
        elif defer:
            seq.pending = token
            self._pending.append(seq)
        else:
            self._emit(seq, token)

    @staticmethod
    def _push_text(seq: _Seq, token: int) -> None:
        delta = seq.detok.push(token)
        if delta:
            _text_out(seq, delta, token)

    def _emit(self, seq: _Seq, token: int) -> bool:
        """A token's text to the handle; True if it completed a stop string (the sequence is finished)."""
        self._push_text(seq, token)
        reason = seq.stopping.on_text(seq.detok)
        if reason is not None:
            self._finish(seq, self._result(seq, reason))
        return reason is not None

    def _emit_pending(self) -> None:
        for seq in self._pending:
            token, seq.pending = seq.pending, None
            if token is not None:  # None: finished meanwhile, its token already emitted (_result)
                self._emit(seq, token)
        self._pending.clear()

    def _reap(self) -> None:
        now = time.time()
        for s in [s for s in self.slots if s is not None]:
            if (reason := s.stopping.on_clock(now)) is not None:
                self._finish(s, self._result(s, reason))

    def _result(self, seq: _Seq, reason: FinishReason) -> Finished:
        if seq.pending is not None:  # finished (cancelled, expired) with a token's text still to emit
            token, seq.pending = seq.pending, None
            self._push_text(seq, token)
        tail = seq.detok.flush()
        if tail:
            _text_out(seq, tail, -1)
        now = time.perf_counter()
        return Finished(
            reason,
            seq.detok.text,
            len(seq.prompt),
            len(seq.generated),
            (seq.t_first or now) - (seq.t_start or now),
            now - (seq.t_first or now),
            list(seq.generated),
            seq.cached,
            list(seq.logprobs) if seq.logprobs is not None else None,
        )

    def _finish(self, seq: _Seq, event: Event) -> None:
        seq.pending = None  # a failed sequence's last text is moot (a result already took it: _result)
        with self._cv:
            if seq.slot >= 0 and self.slots[seq.slot] is seq:
                self._leave(seq, trusted=not isinstance(event, Failed))
                self.slots[seq.slot] = None
                self.finished += 1
            seq.events.put(event)
