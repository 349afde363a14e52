"""Context fitting through the whole stack: a 50-turn conversation at sequence length 128."""

from producer.client import ChatClient
from producer.embedded import InProcessWorker
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings

GREEDY = SamplingParams(temperature=0, output_length=12)


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
