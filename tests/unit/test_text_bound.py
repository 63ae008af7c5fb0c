"""The floor on a text's tokens found without tokenizing it (sagellm.engine.text_bound): never above
the real count, for the bundled tokenizer (texts of its longest entries, emoji, CJK, spaces) and a
Llama-style one (normalizer, byte fallback); and no floor at all where a tokenizer drops text (a
whitespace-splitting pre-tokenizer, a fused unknown token, an added token that strips spaces), or
measured after the normalizer where that one deletes characters."""

from __future__ import annotations

import math

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
from text_only import TextOnly
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sagellm.engine.text_bound import TokenFloor, chars_per_token

CORPUS = ["Hello world, hello there.", "The quick brown fox.", "Say hello to the world."] * 20


def bpe(pre=None, normalizer=None, **model) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(**model))
    tok.pre_tokenizer = pre if pre is not None else pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer is not None:
        tok.normalizer = normalizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre is None else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                        special_tokens=["<unk>", "<|end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def llama_style() -> PreTrainedTokenizerFast:
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bundled():
    from sagellm.model import bundled

    return AutoTokenizer.from_pretrained(str(bundled.bundled_model_dir(None)))


def texts(tokenizer) -> list[str]:
    """Texts whose tokens each cover as much as a token can: the longest vocabulary entries."""
    vocab = tokenizer.get_vocab()
    longest = sorted(vocab, key=len)[-3:]
    words = [tokenizer.convert_tokens_to_string([t]) for t in longest]
    return [w * 200 for w in words] + ["".join(words) * 100, "hello world, " * 2000, "😀" * 3000,
                                        "東京タワー " * 1000, " " * 20000, "\n" * 5000, "def f(x):\n    return x\n" * 500]


@pytest.mark.parametrize("make", ["bundled", "llama_style", "byte_level"])
def test_floor_is_never_above_the_count(make, bundled):
    tok = {"bundled": lambda: bundled, "llama_style": llama_style, "byte_level": bpe}[make]()
    c = chars_per_token(tok)
    assert c is not None and c >= 2
    floor = TokenFloor(tok)
    for text in texts(tok):
        count = len(tok(text, add_special_tokens=False).input_ids)
        assert math.ceil(len(text) / c) <= count, (text[:40], c, count)
        # No floor at or under the count; one above any smaller limit far enough below it.
        assert floor.over(text, count) is None
        small = len(text) // c - 1
        if small >= 1:
            fewest = floor.over(text, small)
            assert fewest is not None and small < fewest <= count, (text[:40], small, fewest, count)


def test_bundled_bound_is_its_longest_entry(bundled):
    assert chars_per_token(bundled) == max(len(t) for t in bundled.get_vocab())


@pytest.mark.parametrize("make,dropped", [
    (lambda: bpe(pre=pre_tokenizers.Whitespace(), unk_token="<unk>"), " "),
    (lambda: bpe(pre=pre_tokenizers.WhitespaceSplit(), unk_token="<unk>"), " "),
    (lambda: bpe(pre=pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Whitespace()]),
                 unk_token="<unk>"), " "),
    (lambda: bpe(pre=pre_tokenizers.Split(" ", "removed"), unk_token="<unk>"), " "),
    (lambda: bpe(pre=pre_tokenizers.Metaspace(), unk_token="<unk>", fuse_unk=True), "€"),  # one <unk>
], ids=["whitespace", "whitespace-split", "sequence", "split-removed", "fused-unk"])
def test_no_floor_where_text_is_dropped(make, dropped):
    tok = make()
    # Why there can be none: 100,000 characters are (at most) a token or two.
    assert len(tok(dropped * 100000, add_special_tokens=False).input_ids) <= 2
    assert chars_per_token(tok) is None
    assert TokenFloor(tok).over(dropped * 100000, 10) is None


def test_added_token_that_strips_spaces_means_no_floor():
    tok = bpe()
    tok.add_tokens([AddedToken("<mask>", lstrip=True)])
    assert chars_per_token(tok) is None
    assert len(tok(" " * 10000 + "<mask>", add_special_tokens=False).input_ids) == 1


def test_text_is_measured_after_the_normalizer():
    tok = bpe(normalizer=normalizers.Replace("x", ""))  # deletes every x
    floor = TokenFloor(tok)
    assert tok("x" * 50000, add_special_tokens=False).input_ids == []
    assert floor.over("x" * 50000, 10) is None
    fewest = floor.over("y" * 50000, 10)
    assert fewest is not None and fewest <= len(tok("y" * 50000, add_special_tokens=False).input_ids)


def test_no_floor_without_a_fast_tokenizer():
    class Slow:
        pass
    assert chars_per_token(Slow()) is None and TokenFloor(Slow()).over("a" * 10**6, 1) is None


PIECES = ["hello", " world", "  ", "   x", "'s", " 's", "12345", " 678", ",", "!!", "\n", " \n ", "\t", "😀",
          " 東京", "ab\u0301c", "__init__", " ĠĠ", "<|im_start|>", " <|im_end|>", "<|end|>", "'", "x'll"]


def random_text(rng, n_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n_pieces))


@pytest.mark.parametrize("make", ["bundled", "llama_style", "byte_level"])
def test_truncate_keeps_the_whole_texts_last_tokens(make, bundled):
    """tokenize(text, last=n) is tokenize(text)[-n:], offsets too, tokenizing only a tail where the
    tokenizer allows an exact cut (ByteLevel's split: the bundled and byte-level ones) and the whole
    text where it does not (a Llama-style one: no pre-tokenizer, BPE over the whole text)."""
    import random
    tok = {"bundled": lambda: bundled, "llama_style": llama_style, "byte_level": bpe}[make]()
    client, floor = TextOnly(tok, None), TokenFloor(tok)
    rng = random.Random(0)
    cut = 0
    for text in texts(tok)[:6] + [random_text(rng, rng.randrange(200, 3000)) for _ in range(40)]:
        whole = tok(text).input_ids
        spans = client.tokenize_with_offsets(text)
        for n in (1, 2, 7, 50, 400):
            assert client.tokenize(text, last=n) == whole[-n:], (text[:60], n)
            assert client.tokenize(text, last=n, add_special_tokens=False) == tok(text, add_special_tokens=False).input_ids[-n:]
            assert client.tokenize_with_offsets(text, last=n) == spans[-n:], (text[:60], n)
            cut += floor.tail_start(text, n) > 0
    if make == "llama_style":
        assert cut == 0  # no exact cut: the whole text every time
    else:
        assert cut > 100  # most of the long random texts were cut


def test_a_tail_is_cut_only_after_a_word_character_before_a_space(bundled):
    floor, c = TokenFloor(bundled), chars_per_token(bundled)
    text = "ab " + "x" * (10 * c)  # the only cut: before the space at 2
    assert floor.tail_start(text, 5) == 2
    assert floor.tail_start("x" * (10 * c), 5) == 0  # none: the whole text
    assert floor.tail_start(" " * (10 * c) + "x", 5) == 0
    assert floor.tail_start("ab cd", 5) == 0  # shorter than 5 tokens can be: the whole text
