"""Incremental detokenizing, token by token, equals decoding the whole text, with both
detokenizers (DecodeStream, and the window decode for tokenizers without a Rust backend): for a
byte-level BPE tokenizer (GPT-2 style) and a Llama-style one (▁ word marks, byte-fallback
tokens), with multi-byte characters split across tokens, the first token's leading space kept,
and special tokens written out."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sagellm.engine.detokenizer import StreamDetokenizer, WindowDetokenizer, make_detokenizer

CORPUS = ["Hello world, hello there.", "The quick brown fox.", "Say hello to the world."] * 20
# Characters the tokenizers never saw, written as several byte tokens each.
GENERATED = " Hello world: 東京 🚀 naïve café."


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def llama_style() -> PreTrainedTokenizerFast:
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def window(tokenizer, prompt_ids):
    return WindowDetokenizer(tokenizer, prompt_ids[-5:])


def test_fast_tokenizers_get_decode_stream():
    assert isinstance(make_detokenizer(byte_level(), [1, 2]), StreamDetokenizer)


@pytest.mark.parametrize("detokenizer", [make_detokenizer, window])
@pytest.mark.parametrize("make", [byte_level, llama_style])
def test_pieces_add_up_to_the_decoded_text(make, detokenizer):
    tok = make()
    prompt = tok("Say hello", add_special_tokens=False).input_ids
    # A Llama-style tokenizer writes the space before a word into the word's token (▁Hello),
    # and drops it when that token starts the text: only the prompt before it keeps the space.
    generated = tok(GENERATED[1:] if make is llama_style else GENERATED, add_special_tokens=False).input_ids
    generated.append(tok.eos_token_id)
    detok = detokenizer(tok, prompt)
    pieces = [detok.step(t) for t in generated]
    whole = tok.decode(prompt + generated)
    assert "".join(pieces) == whole[len(tok.decode(prompt)):]
    assert pieces[0].startswith(" "), pieces[:3]  # the first token's leading space
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == tok.eos_token  # special tokens are written out
    # A character written as several byte tokens comes out whole, with its last byte token.
    rocket = next(i for i, p in enumerate(pieces) if "🚀" in p)
    assert pieces[rocket - 1] == "" and pieces[rocket].endswith("🚀")
