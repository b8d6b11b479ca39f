"""Examples to token ids and back (layout.py): the prompt and target of every layout, the CoT
segments each latent step covers, their labels, and padding into batches."""

from fractions import Fraction

import torch

from system15.data import Example, Step
from system15.layout import (IGNORE, answer_critical, cot_target, encode, pad, prompt, segment_ends, segment_results,
                             segments, sequence_batch, thought_critical)
from system15.tokenizer import CharTokenizer

EXAMPLE = Example("a=12,b=3. a+b?", (Step("<<12+3=15>>", "15", False), Step("<<15*2=30>>", "30", True),
                                      Step("<<30-1=29>>", "29", True)), "29")
TOK = CharTokenizer.from_texts([EXAMPLE.text])


def test_prompt_and_cot_target_decode_back_to_the_example():
    e = encode(TOK, EXAMPLE)
    assert TOK.decode(e.question) == EXAMPLE.question
    assert prompt(TOK, e) == e.question + [TOK.bot_id]
    assert TOK.decode(e.chain) == EXAMPLE.cot  # steps joined by single spaces
    assert [TOK.decode(s) for s in e.steps] == ["<<12+3=15>>", " <<15*2=30>>", " <<30-1=29>>"]
    assert e.answer[-1] == TOK.eos_id and TOK.decode(e.answer[:e.marker]) == "#### "
    assert TOK.decode(e.answer) == "#### 29"  # <eos> is a special id: not text
    target = cot_target(TOK, e)
    assert target == e.chain + [TOK.eot_id] + e.answer
    assert TOK.decode(prompt(TOK, e) + target) == EXAMPLE.question + EXAMPLE.cot + "#### 29"


def test_each_step_keeps_its_label_result_and_operands():
    e = encode(TOK, EXAMPLE)
    assert e.critical == [False, True, True]
    assert e.results == ("15", "30", "29")
    assert e.operands == (frozenset({Fraction(12), Fraction(3)}), frozenset({Fraction(15), Fraction(2)}),
                          frozenset({Fraction(30), Fraction(1)}))
    prose = encode(TOK, Example("q", (Step("3 + 2", "5", False),), "5"))
    assert prose.operands == (None,)  # not a calculator note: nothing read from it


def test_segments_split_the_chain_as_evenly_as_the_floors_allow():
    """Latent step k of K covers steps [floor((k-1)S/K), floor(kS/K)) of the S = 3 steps."""
    e = encode(TOK, EXAMPLE)
    assert segments(e, 1) == [range(0, 3)]
    assert segments(e, 2) == [range(0, 1), range(1, 3)]
    assert segments(e, 4) == [range(0, 0), range(0, 1), range(1, 2), range(2, 3)]  # the first is empty
    # the steps are 9, 10 and 10 ids long ("<<" and ">>" are one id each): they end at 8, 18, 28
    assert segment_ends(e, 2) == [8, 28]
    assert segment_ends(e, 4) == [None, 8, 18, 28]
    assert segment_results(e, 2) == [["15"], ["30", "29"]]


def test_labels_of_thought_steps_and_answer_ids():
    e = encode(TOK, EXAMPLE)
    assert thought_critical(e, 2) == [False, True]  # a latent step is critical when a step it covers is
    assert thought_critical(e, 4) == [False, False, True, True]
    assert answer_critical(e) == [False, True, True, False]  # "#### ", "2", "9", <eos>


def test_pad_right_and_left():
    ids, visible = pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and visible.tolist() == [[True] * 3, [True, False, False]]
    ids, visible = pad([[1, 2, 3], [4]], pad_id=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and visible.tolist() == [[True] * 3, [False, False, True]]
    ids, visible = pad([], pad_id=0)
    assert ids.shape == visible.shape == (0, 0)


def test_sequence_batch_labels_each_position_with_the_token_it_predicts():
    ids, visible, labels = sequence_batch([([1, 2], [3, 4]), ([5], [6])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert visible.tolist() == [[True] * 4, [True, True, False, False]]
    assert labels.tolist() == [[IGNORE, 3, 4, IGNORE], [6, IGNORE, IGNORE, IGNORE]]
    assert labels.dtype == torch.long
