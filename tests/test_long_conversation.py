"""Context fitting through the whole stack: a 50-turn conversation at sequence length 128."""

from producer.client import ChatClient
from producer.embedded import InProcessWorker
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_a_long_conversation_never_fails_and_records_what_was_dropped(r, redis_url):
    settings = tiny_settings(redis_url, sequence_length=128)
    worker = InProcessWorker(settings).start()
    client = ChatClient(settings)
    try:
        _long_conversation(client)
    finally:
        client.close()
        worker.stop()


def _long_conversation(client: ChatClient) -> None:
    cid = client.create_conversation("tiny-neox", system="sys")
    results = [client.ask(cid, f"message number {i} " + "x" * 20, GREEDY, timeout=60) for i in range(50)]
    assert len(client.store.messages(cid)) == 100
    assert all(r.prompt_tokens + r.completion_tokens <= 128 for r in results)
    assert results[0].dropped_messages == 0 and results[-1].dropped_messages > 50
    assert all(r.truncated_tokens == 0 for r in results)


def stored_conversation(client: ChatClient, n: int, text_chars: int = 40) -> str:
    """A conversation with `n` stored messages, written straight into Redis (as years of chatting would)."""
    from shared.messages import ChatMessage, Role

    cid = client.create_conversation("tiny-neox", system="sys")
    key = client.keys.messages(cid)
    for start in range(0, n, 1000):
        msgs = [ChatMessage(role=Role.prompter if i % 2 == 0 else Role.assistant, text=f"m{i} " + "w" * text_chars)
                for i in range(start, min(n, start + 1000))]
        client.r.rpush(key, *[m.model_dump_json() for m in msgs])
    return cid


def test_a_turn_costs_the_same_whatever_the_stored_history(r, redis_url):
    """10, 1,000, 20,000 stored messages, and 50 MB of history: the task payload and the worker's time follow
    the model's context (sequence length 256 here), not the history; the store keeps the newest 10,000."""
    import time

    settings = tiny_settings(redis_url)
    worker = InProcessWorker(settings).start()
    client = ChatClient(settings)
    rows = []
    try:
        for n, chars in ((10, 40), (1_000, 40), (20_000, 40), (820, 63_900)):  # the last: ~52 MB
            cid = stored_conversation(client, n, chars)
            t0 = time.perf_counter()
            turn = client.send(cid, "and now?", GREEDY)
            start_s = time.perf_counter() - t0
            res = client.wait(turn.turn_id, timeout=60)
            rows.append((n, chars, start_s, turn.payload_bytes, res.prompt_tokens, res.timings.prefill_s
                         + res.timings.decode_s, res.dropped_messages))
            assert turn.payload_bytes < 300_000 and res.prompt_tokens < 256
            assert res.dropped_messages >= n - 60  # the model saw the newest few only
            kept = min(n + 1, settings.max_history_messages) + 1  # capped when the user message goes in; + the reply
            assert r.llen(client.keys.messages(cid)) == kept  # the history cap: the oldest go
            if n + 1 > settings.max_history_messages:
                assert int(r.hget(client.keys.conv(cid), "trimmed")) == n + 1 - settings.max_history_messages
    finally:
        client.close()
        worker.stop()
    print("\nstored messages | chars each | start_turn s | payload bytes | prompt tokens | worker s | dropped")
    for row in rows:
        print(" | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row))
