"""Property tests of the character tokenizer: hostile text never makes it raise, text over its
alphabet survives a round trip, and a saved tokenizer reads back the same."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from system15.tokenizer import LAYOUT_SYMBOLS, CharTokenizer, load_tokenizer

TASK_TEXT = ["a=9, b=3. c=a+b? || <<9+3=12>> <<12-2=10>> #### 10", "Natalia sold 48/2 = 24 clips."]
TOK = CharTokenizer.from_texts(TASK_TEXT)
ALPHABET = sorted(t for t in TOK.tokens[5:] if len(t) == 1)

any_text = st.text(st.characters(codec="utf-8"), max_size=200)
alphabet_text = st.lists(st.sampled_from(ALPHABET + list(LAYOUT_SYMBOLS)), max_size=100).map("".join)


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_encode_decode_never_raise_and_ids_are_in_range(text):
    ids = TOK.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(TOK) for i in ids)
    assert len(ids) <= len(text)
    assert isinstance(TOK.decode(ids), str)


@settings(max_examples=300, deadline=None)
@given(alphabet_text)
def test_round_trip_over_the_alphabet(text):
    assert TOK.decode(TOK.encode(text)) == text


FOREIGN = st.characters(codec="utf-8").filter(lambda c: c not in TOK.ids and all(c not in s for s in LAYOUT_SYMBOLS))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(alphabet_text, FOREIGN.map(lambda c: ("foreign", c))), max_size=30))
def test_unknown_characters_are_dropped_and_the_rest_kept(parts):
    """Unknown characters become <unk>, which decoding drops; everything else survives."""
    text = "".join(p[1] if isinstance(p, tuple) else p for p in parts)
    known = "".join(p for p in parts if not isinstance(p, tuple))
    ids = TOK.encode(text)
    assert ids.count(TOK.unk_id) == sum(isinstance(p, tuple) for p in parts)
    assert TOK.decode(ids) == known


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_decoding_keeps_characters_in_order(text):
    decoded = TOK.decode(TOK.encode(text))
    it = iter(text)
    assert all(c in it for c in decoded)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-10**6, max_value=10**6), max_size=100))
def test_decode_of_arbitrary_ids_never_raises(ids):
    assert isinstance(TOK.decode(ids), str)


@settings(max_examples=200, deadline=None)
@given(st.lists(any_text, min_size=1, max_size=5))
def test_tokenizer_built_from_any_text_round_trips_it(texts):
    tok = CharTokenizer.from_texts(texts)
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert (tok.pad_id, tok.eos_id, tok.bot_id, tok.eot_id) == (0, 1, 2, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(any_text, min_size=1, max_size=3), any_text)
def test_saved_tokenizer_loads_back_identical(texts, probe):
    tok = CharTokenizer.from_texts(texts)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        back = load_tokenizer(d)
    assert back.tokens == tok.tokens
    assert back.encode(probe) == tok.encode(probe)


def test_markers_in_text_are_plain_characters_not_special_ids():
    """Text that spells `<bot>` must not inject the thought marker."""
    tok = CharTokenizer.from_texts(["<bot> <eot> <pad> <eos>"])
    ids = tok.encode("<bot><eos>")
    assert tok.bot_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "<bot><eos>"
