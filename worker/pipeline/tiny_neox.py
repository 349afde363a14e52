"""`tiny-neox`: a small GPT-NeoX with random weights from a fixed seed, built offline in a second.

It has the OASST checkpoint's quirks that the pipeline must handle: the OASST special tokens (in a
different id order than the real checkpoint, so code that hard-codes ids breaks), bos = eos =
<|endoftext|>, and an embedding padded past the tokenizer (to a multiple of 16) whose extra rows
must never be sampled. The tokenizer is byte-level BPE with no merges: every byte is a token.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|padding|>",
    "<|prompter|>",
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|prefix_begin|>",
    "<|prefix_end|>",
]
SEED = 1234


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges (one token per byte) plus the OASST special tokens; bos = eos =
    <|endoftext|>, pad <|padding|>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|padding|>")]}
    )
    return fast


def build_model(vocab: int, dtype: torch.dtype = torch.float32) -> GPTNeoXForCausalLM:
    """A 2-layer GPT-NeoX (hidden 64, 4 heads) with random weights from SEED, `vocab` embedding rows padded up to
    a multiple of 16 (as OASST's 50288), in `dtype` and eval mode. The global RNG state is left as it was."""
    padded = (vocab + 15) // 16 * 16  # like OASST's 50288: rows past the tokenizer exist but are not tokens
    cfg = GPTNeoXConfig(
        vocab_size=padded,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(SEED)
        model = GPTNeoXForCausalLM(cfg)
        # Random weights spread logits thinly; a larger head gives sampling clear favourites.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    return model.to(dtype).eval()


def build() -> tuple[PreTrainedTokenizerFast, GPTNeoXForCausalLM]:
    """The tiny-neox tokenizer and fp32 model, the model's bos/eos set to <|endoftext|>'s id."""
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    model = build_model(len(tok))
    model.config.bos_token_id = model.config.eos_token_id = eos
    return tok, model
