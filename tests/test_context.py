"""shared/context.py: a conversation longer than the sequence length never fails."""

import pytest

from shared.context import ContextError, ContextLengthExceeded, fit, fit_turn
from shared.messages import ChatMessage, Role

U, A, S = Role.prompter, Role.assistant, Role.system


def conv(n_turns: int, size: int = 20, system: str | None = "Be kind.") -> list[ChatMessage]:
    out = [ChatMessage(role=S, text=system)] if system else []
    for i in range(n_turns):
        out.append(ChatMessage(role=U, text=f"question {i} " + "q" * size))
        if i < n_turns - 1:
            out.append(ChatMessage(role=A, text=f"answer {i} " + "a" * size))
    return out


def decode(tiny, ids):
    return tiny.tokenizer.decode(ids)


def test_short_conversation_is_kept_whole(tiny):
    f = fit(tiny.codec, conv(2), 256, 10)
    assert (f.dropped_messages, f.truncated_tokens, f.max_new) == (0, 0, 10)
    assert decode(tiny, f.ids).startswith("<|system|>Be kind.<|endoftext|><|prompter|>question 0")


def test_drops_whole_oldest_turns_and_keeps_the_system_prompt(tiny):
    f = fit(tiny.codec, conv(12), 256, 32)
    text = decode(tiny, f.ids)
    assert f.dropped_messages > 0 and f.dropped_messages % 2 == 0  # whole user+assistant turns
    assert text.startswith("<|system|>Be kind.<|endoftext|><|prompter|>question ")
    assert text.endswith("question 11 " + "q" * 20 + "<|endoftext|><|assistant|>")
    assert len(f.ids) + f.max_new <= 256 and f.max_new == 32
    first_kept = f.dropped_messages // 2
    assert f"question {first_kept} " in text and f"question {first_kept - 1} " not in text


def test_output_budget_shrinks_to_what_is_left(tiny):
    f = fit(tiny.codec, conv(1, size=180, system=None), 256, None)
    assert f.max_new == 256 - len(f.ids)


def test_overlong_newest_message_keeps_its_end(tiny):
    msgs = [ChatMessage(role=S, text="sys"), ChatMessage(role=U, text="START" + "m" * 600 + "THE END")]
    f = fit(tiny.codec, msgs, 256, 16)
    text = decode(tiny, f.ids)
    assert f.truncated_tokens > 0 and "START" not in text
    assert text.startswith("<|system|>sys<|endoftext|><|prompter|>")
    assert text.endswith("THE END<|endoftext|><|assistant|>")  # special tokens intact
    assert len(f.ids) + f.max_new <= 256


def test_special_tokens_are_never_split(tiny):
    msgs = conv(30, size=33)
    f = fit(tiny.codec, msgs, 200, 50)
    specials = tiny.codec.special_ids
    # every kept special token is whole: the byte tokenizer would show a split one as '<|'... bytes
    assert "<|prompter|>" not in tiny.tokenizer.decode([t for t in f.ids if t not in specials])
    assert f.ids[-1] == tiny.tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_no_room_for_one_token_is_a_clear_error(tiny):
    with pytest.raises(ContextError, match="system prompt"):
        fit(tiny.codec, [ChatMessage(role=S, text="s" * 500), ChatMessage(role=U, text="hi")], 128, 8)
    with pytest.raises(ContextError, match="max_tokens"):
        fit(tiny.codec, conv(1), 128, 128)


def test_a_history_opening_with_an_assistant_message_is_kept_whole_when_it_fits(tiny):
    msgs = [ChatMessage(role=S, text="sys"), ChatMessage(role=A, text="Hello! How can I help?"),
            ChatMessage(role=U, text="hi")]
    for truncate in (True, False):
        f = fit_turn(tiny.codec, msgs, 256, 5, truncate=truncate)
        assert (f.dropped_messages, f.truncated_tokens) == (0, 0)
        assert decode(tiny, f.ids).startswith("<|system|>sys<|endoftext|><|assistant|>Hello!")


def test_without_truncation_the_numbers_decide(tiny):
    """OpenAI's rule: the prompt and max_tokens (or one token) must fit as they are."""
    short = [ChatMessage(role=U, text="hi")]
    n = len(fit(tiny.codec, short, 256, None).ids)
    assert fit_turn(tiny.codec, short, 256, 256 - n, truncate=False).max_new == 256 - n
    with pytest.raises(ContextLengthExceeded, match=rf"maximum context length is 256 tokens, but the messages "
                       rf"take {n} tokens and {257 - n} for the output"):
        fit_turn(tiny.codec, short, 256, 257 - n, truncate=False)
    with pytest.raises(ContextLengthExceeded) as e:
        fit_turn(tiny.codec, conv(20), 256, None, truncate=False)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
