"""Tests for kvcellar.engine.text_stream: stop-string matching and incremental detokenizing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvcellar.engine.text_stream import IncrementalDetokenizer, StopMatch, StopStringMatcher

# --- StopStringMatcher --------------------------------------------------------


def one_shot(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference: cut at the first end position where the text ends with a stop string."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            longest = max(hits, key=len)
            return text[: end - len(longest)], longest
    return text, None


def stream(pieces: list[str], stops: list[str]) -> tuple[str, str | None, list[str]]:
    matcher = StopStringMatcher(stops)
    emitted = []
    for piece in pieces:
        emitted.append(matcher.push(piece).text)
    if not matcher.stopped:
        emitted.append(matcher.flush())
    return "".join(emitted), matcher.stop, emitted


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


ALPHABET = "ab<>/"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4),
    data=st.data(),
)
def test_streaming_matches_one_shot_for_any_split(text, stops, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    output, stop, _ = stream(split_at(text, cuts), stops)
    assert (output, stop) == one_shot(text, stops)


def test_partial_match_is_held_then_released():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("hello </e") == StopMatch("hello ")
    assert matcher.push("x more") == StopMatch("</ex more")
    assert matcher.push("</") == StopMatch("")
    assert matcher.flush() == "</"
    assert not matcher.stopped


def test_stop_split_over_pieces_is_cut_and_not_emitted():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abcST") == StopMatch("abc")
    assert matcher.push("OPtail") == StopMatch("", "STOP")
    assert matcher.stopped and matcher.stop == "STOP"
    assert matcher.push("more") == StopMatch("", "STOP")


def test_earliest_ending_stop_wins_and_the_longest_of_ties():
    # "c" completes before "abcd" could, so generation stops there.
    assert stream(["abcd"], ["abcd", "c"])[:2] == ("ab", "c")
    # Both end at the same character: cut before the longer one.
    assert stream(["xabc"], ["c", "abc"])[:2] == ("x", "abc")


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == StopMatch("anything")
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


# --- IncrementalDetokenizer ---------------------------------------------------

CORPUS = [
    "héllo wörld 你好 🙂",
    "hello world, hello tokenizer",
    "wörld héllo again and again",
    "你好世界 🙂🙂 smile",
]
SPECIAL = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: few merges, so most non-ASCII characters span several tokens."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=SPECIAL, clean_up_tokenization_spaces=False
    )


def push_all(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids]


def test_fixture_splits_multibyte_characters(tokenizer):
    # Guard: the tests below only mean something if single tokens are partial characters.
    ids = tokenizer.encode("🙂€", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", [*CORPUS, "naïve café € 😀 日本語 ok", "🙂"])
def test_push_then_flush_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detok, ids)
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incomplete_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 3  # "a" plus the 4 bytes of 😀 in at least two tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detok, ids)
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "😀"
    assert detok.flush() == ""


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    ids = [*tokenizer.encode("héllo", add_special_tokens=False), eos,
           *tokenizer.encode(" 你好", add_special_tokens=False), eos]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detok, ids)
    pieces.append(detok.flush())
    assert "".join(pieces) == "héllo 你好"


def test_flush_releases_a_never_completed_character(tokenizer):
    # The first byte of "€" alone: invalid UTF-8 at the end of generation.
    euro_tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("€", add_special_tokens=False))
    # Byte-level tokens spell each byte as one character; every byte is in the vocab.
    first_byte = tokenizer.convert_tokens_to_ids(euro_tokens[0][0])
    x = tokenizer.convert_tokens_to_ids("x")
    detok = IncrementalDetokenizer(tokenizer)
    assert push_all(detok, [x, first_byte]) == ["x", ""]
    assert detok.flush() == "\ufffd"


def test_prompt_ids_give_context_but_are_not_emitted(tokenizer):
    prompt = tokenizer.encode("hello 你", add_special_tokens=False)
    generated = tokenizer.encode("好 wörld", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    pieces = push_all(detok, generated)
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(generated) == "好 wörld"


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="aé你🙂€ ö😀", max_size=20),
    specials=st.lists(st.integers(0, 20), max_size=3),
)
def test_any_text_with_specials_streams_exactly(tokenizer, text, specials):
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    for position in sorted(specials, reverse=True):
        ids.insert(min(position, len(ids)), eos)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detok, ids)
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
