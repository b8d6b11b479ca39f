"""The GSM8K splits (data/splits.py): GSM8K train without the GSM8K-Aug validation questions."""

import pytest

from system15.data import DataError, gsm8k_train_split, read_examples
from tests.helpers import DATA_ROOT as DATA
from tests.helpers import needs_shared_data

pytestmark = needs_shared_data


def test_train_split_holds_out_validation():
    train = gsm8k_train_split(str(DATA / "gsm8k/train.jsonl"), str(DATA / "gsm8k_aug/valid.txt"))
    assert len(train) == 6973
    valid = {" ".join(e.question.split()) for e in read_examples(DATA / "gsm8k_aug/valid.txt")}
    assert not valid & {" ".join(e.question.split()) for e in train}


def test_missing_validation_question_is_reported(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "Only this one?", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"valid\.txt:1: question: validation question not found"):
        gsm8k_train_split(train, DATA / "gsm8k_aug/valid.txt")
