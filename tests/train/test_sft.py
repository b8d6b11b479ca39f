"""Stage 0 (train/sft.py): CoT-SFT learns everything after the prompt, No-CoT only the answer
after `<bot> <eot>`; both answer with the K their weights were trained for."""

from system15.layout import IGNORE, cot_target, prompt
from system15.train.sft import CoTSFT, NoCoTSFT
from tests.helpers import encoded, tiny_config, tiny_model


def rows(batch):
    """Per row: the visible ids, and the labels that are set."""
    ids = [r[v].tolist() for r, v in zip(batch["ids"], batch["visible"])]
    return ids, [[t for t in r.tolist() if t != IGNORE] for r in batch["labels"]]


def test_cot_learns_the_chain_the_end_of_thought_and_the_answer(examples):
    model = tiny_model(examples, thought=None)
    tok, enc = model.tokenizer, encoded(model, examples[:3])
    ids, labels = rows(CoTSFT(tiny_config()).collate(model, enc))
    assert ids == [prompt(tok, e) + cot_target(tok, e) for e in enc]
    assert labels == [cot_target(tok, e) for e in enc]
    assert tok.decode(labels[0]) == f"{examples[0].cot}#### {examples[0].answer}"


def test_nocot_learns_the_answer_only(examples):
    model = tiny_model(examples, thought=None)
    tok, enc = model.tokenizer, encoded(model, examples[:3])
    ids, labels = rows(NoCoTSFT(tiny_config()).collate(model, enc))
    assert ids == [prompt(tok, e) + [tok.eot_id] + e.answer for e in enc]
    assert labels == [e.answer for e in enc]


def test_each_labels_its_model_with_the_K_it_answers_with(examples):
    model = tiny_model(examples, thought=None)
    for objective, K in ((CoTSFT(tiny_config()), None), (NoCoTSFT(tiny_config()), 0)):
        objective.prepare(model)
        assert (model.method, model.thought, model.spec.K) == (objective.name, None, K)


def test_the_loss_is_the_nll_of_the_targets_and_trains_the_backbone(examples):
    model = tiny_model(examples, thought=None).train()
    objective = CoTSFT(tiny_config())
    objective.prepare(model)
    loss, metrics = objective.loss(model, objective.collate(model, encoded(model, examples[:4])))
    assert metrics == {"nll": loss.item()} and loss.item() > 0
    loss.backward()
    assert model.backbone.layers[0].mlp.c_fc.weight.grad.abs().sum() > 0
