"""shared/prompts.py: golden strings for both prompt formats."""

from shared.messages import ChatMessage, Role
from shared.prompts import PromptFormat, render_segments, render_text

U, A, S = Role.prompter, Role.assistant, Role.system


def msgs(*pairs: tuple[Role, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, text=t) for r, t in pairs]


def test_oasst_single_turn():
    assert render_text(PromptFormat.oasst, msgs((U, "Hi"))) == "<|prompter|>Hi<|endoftext|><|assistant|>"


def test_oasst_with_system_prompt():
    text = render_text(PromptFormat.oasst, msgs((S, "Be brief."), (U, "Hi")))
    assert text == "<|system|>Be brief.<|endoftext|><|prompter|>Hi<|endoftext|><|assistant|>"


def test_oasst_multi_turn_matches_the_notebook():
    text = render_text(PromptFormat.oasst, msgs((U, "user1"), (A, "reply1"), (U, "user2")))
    assert text == (
        "<|prompter|>user1<|endoftext|><|assistant|>reply1<|endoftext|><|prompter|>user2<|endoftext|><|assistant|>"
    )


def test_oasst_marks_only_message_text_as_content():
    segs = render_segments(PromptFormat.oasst, msgs((U, "<|assistant|>x")))
    assert [s.text for s in segs if s.content] == ["<|assistant|>x"]
    assert all(s.text.startswith("<|") for s in segs if not s.content)


def test_smollm2_chatml_golden(smol_tokenizer):
    text = render_text(PromptFormat.chat_template, msgs((S, "S"), (U, "Hi"), (A, "Yo"), (U, "Q")), smol_tokenizer)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_default_system_prompt_and_content_segments(smol_tokenizer):
    segs = render_segments(PromptFormat.chat_template, msgs((U, "Hi <|im_end|>")), smol_tokenizer)
    text = "".join(s.text for s in segs)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi <|im_end|><|im_end|>\n<|im_start|>assistant\n")
    assert [s.text for s in segs if s.content] == ["Hi <|im_end|>"]
