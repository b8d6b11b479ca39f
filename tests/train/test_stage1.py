"""Stage 1 (train/stage1.py): teacher and student share weights, the alignment rules, the
probes, a teacher on part of the batch, and the levers of the latent distillation."""

import pytest
import torch

from system15.config import ALIGN_RULES
from system15.layout import IGNORE, encode, sequence_batch
from system15.train.objective import thought_forward
from system15.train.stage1 import LatentDistillation, codi_alignment, probe_nll, probe_readout, segment_alignment
from tests.helpers import encoded, tiny_config, tiny_model


def test_teacher_and_student_share_parameters(examples):
    model = tiny_model(examples)
    obj = LatentDistillation(tiny_config())
    obj.prepare(model)
    batch = obj.collate(model, encoded(model, examples[:4]))
    _, metrics = obj.loss(model, batch)
    from system15.train.objective import sequence_forward

    grads = {}
    for name, fn in (("teacher", lambda: sequence_forward(model, batch["teacher"])[0]),
                     ("student", lambda: thought_forward(model, batch["student"], 2).nll)):
        model.zero_grad()
        fn().backward()
        grads[name] = model.backbone.layers[0].mlp.c_fc.weight.grad.clone()
    assert grads["teacher"].abs().sum() > 0 and grads["student"].abs().sum() > 0
    assert not torch.equal(grads["teacher"], grads["student"])  # one tensor, two sources of gradient
    assert set(metrics) == {"teacher_nll", "student_nll", "align"}


@pytest.mark.parametrize("rule", ALIGN_RULES)
def test_every_alignment_rule_sends_gradient_to_the_latent_steps(examples, rule):
    """The alignment term alone (alpha 1 minus alpha 0) moves P, which only latent steps read."""
    grads = []
    for alpha in (0.0, 1.0):
        model = tiny_model(examples)
        obj = LatentDistillation(tiny_config(**{"stage1.align": rule, "stage1.alpha": alpha}))
        obj.prepare(model)
        loss, metrics = obj.loss(model, obj.collate(model, encoded(model, examples[:4])))
        loss.backward()
        grads.append(model.projection.net[0].weight.grad.clone())
    assert metrics["align"] > 0
    assert not torch.allclose(grads[0], grads[1])


def test_alignment_is_zero_when_states_coincide():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 9, 16, generator=g)
    pos = torch.tensor([[2, 5], [3, -1], [4, 8]])
    thoughts = [teacher[torch.arange(3), pos[:, k].clamp(min=0)].clone() for k in range(2)]
    assert segment_alignment(teacher, thoughts, pos) == 0
    thoughts[1][1] += 5.0  # row 1 has no second segment: not aligned
    assert segment_alignment(teacher, thoughts, pos) == 0
    thoughts[0][0] += 1.0
    assert segment_alignment(teacher, thoughts, pos) == pytest.approx(1.0 / 5)  # 16 of 5 x 16 entries off by 1
    for scale in ("std", "dim"):
        assert segment_alignment(3 * teacher, [3 * t for t in thoughts], pos, normalise=scale) == \
            pytest.approx(segment_alignment(teacher, thoughts, pos, normalise=scale))
    layers = [torch.randn(3, 9, 16, generator=g) for _ in range(3)]
    before = torch.tensor([4, 6, 7])
    for scale in ("std", "dim"):
        assert codi_alignment(layers, layers, before, before, scale=scale) == 0
        assert codi_alignment(layers, [l + 0.1 for l in layers], before, before, scale=scale) > 0


def test_per_dimension_scale_weighs_the_dimensions_that_tell_examples_apart():
    """align_scale "dim": an error in a dimension that barely varies over the batch counts
    more than the same error in one that varies a lot; "std" weighs them the same."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, 4, generator=g) * torch.tensor([10.0, 1.0, 1.0, 1.0])
    pos = torch.zeros(8, 1, dtype=torch.long)
    off = {d: [teacher[:, 0] + torch.eye(4)[d]] for d in (0, 1)}  # off by 1 in dimension d
    std = {d: segment_alignment(teacher, off[d], pos, normalise="std") for d in (0, 1)}
    dim = {d: segment_alignment(teacher, off[d], pos, normalise="dim") for d in (0, 1)}
    assert std[0] == pytest.approx(std[1])
    assert dim[1] > 20 * dim[0]
    sd = teacher[:, 0].std(0)
    assert dim[0] == pytest.approx(1 / sd[0] ** 2 / 4) and dim[1] == pytest.approx(1 / sd[1] ** 2 / 4)


def test_warm_start_replaces_segments_one_at_a_time(examples):
    model = tiny_model(examples)
    obj = LatentDistillation(tiny_config(**{"architecture.K": 2, "experimental.warm_start": 0.5, "stage1.probe": 1.0}))
    enc = encoded(model, examples[:4])
    obj.on_step(0, 10)
    warm = obj.collate(model, enc)
    obj.on_step(5, 10)
    full = obj.collate(model, enc)
    assert warm["K"] == 1 and full["K"] == 2
    assert len(warm["probes"]) == 1 and len(full["probes"]) == 2
    assert int(warm["student"]["tail_visible"].sum()) > int(full["student"]["tail_visible"].sum())
    assert bool((warm["segment_pos"][:, 1] == -1).all())
    assert not obj.selectable(5, 10) and obj.selectable(6, 10)
    loss, metrics = obj.loss(model, warm)
    assert torch.isfinite(loss) and set(metrics) >= {"probe_nll", "align"}


def test_probe_targets_every_segment_result_or_only_the_last(examples):
    model = tiny_model(examples)
    tok = model.tokenizer
    enc = encoded(model, examples[:4])  # 3-step chains: with K=1 one segment holds all three results
    targets = {}
    for which in ("all", "last"):
        obj = LatentDistillation(tiny_config(**{"architecture.K": 1, "stage1.probe": 1.0, "stage1.probe_results": which}))
        (probe,) = obj.collate(model, enc)["probes"]  # the last probe: "last" reads it off the answer tail
        labels = probe["tail_labels" if which == "last" else "labels"]
        targets[which] = [tok.decode([t for t in row.tolist() if t >= 0]) for row in labels]
    for e, every, last in zip(enc, targets["all"], targets["last"]):
        assert every.split() == ["####", *e.results] and last.split() == ["####", e.results[-1]]


def test_live_probe_targets_are_the_values_a_latent_step_hands_on():
    """probe_results = live: after latent step k, every result up to its segment's end that a
    later step reads, the most recent first. Two independent results that a later step
    combines are both asked for; a result only its own segment used is not; the last step
    hands on the answer."""
    from system15.data import Example, Step
    from system15.data.synthetic import SyntheticTask
    from system15.layout import segment_live

    def example(*notes):
        steps = tuple(Step(n, n[2:-2].rpartition("=")[2], critical=False) for n in notes)
        return Example("q", steps, steps[-1].result)

    model = tiny_model([SyntheticTask(n_steps=4).generate(1, seed=0)[0]])
    tok = model.tokenizer
    both = encode(tok, example("<<6+6=12>>", "<<8-7=1>>", "<<12-1=11>>", "<<11+7=18>>"))  # c, f, then g=c-f
    chained = encode(tok, example("<<9+3=12>>", "<<12-2=10>>", "<<10-9=1>>", "<<1+7=8>>"))  # c, d=c-2, ...
    assert segment_live(both, 2) == [["1", "12"], ["18"]]
    assert segment_live(chained, 2) == [["10"], ["8"]]
    assert segment_live(chained, 4) == [["12"], ["10"], ["1"], ["8"]]
    prose = encode(tok, Example("q", (Step("6 eggs", "6", False), Step("+ 2", "8", True)), "8"))
    assert segment_live(prose, 2) == [["6"], ["8"]]  # not calculator notes: the last result
    obj = LatentDistillation(tiny_config(**{"architecture.K": 2, "stage1.probe": 1.0, "stage1.probe_results": "live"}))
    first, _ = obj.collate(model, [both, chained])["probes"]
    asked = [tok.decode([t for t in row.tolist() if t != IGNORE]).split() for row in first["labels"]]
    assert asked == [["####", "1", "12"], ["####", "10"]]


def test_the_last_probe_is_read_off_the_answer_tail(examples):
    """After the last latent step the probe's branch would repeat the answer tail's first
    tokens from the same cache; its NLL read off the tail is the branch's own."""
    model = tiny_model(examples)
    tok = model.tokenizer
    obj = LatentDistillation(tiny_config(**{"architecture.K": 2, "stage1.probe": 1.0, "stage1.probe_results": "last"}))
    enc = encoded(model, examples[:4])
    batch = obj.collate(model, enc)
    first, last = batch["probes"]
    assert "ids" in first and set(last) == {"tail_labels"}  # step 1's branch has its own cache
    targets = [[t for t in row.tolist() if t != IGNORE] for row in last["tail_labels"]]
    assert [tok.decode(t).split() for t in targets] == [["####", e.results[-1]] for e in enc]
    ids, visible, labels = sequence_batch([([tok.eot_id], t) for t in targets], tok.pad_id)
    with torch.no_grad():  # a branch grows its cache: each probe_nll call gets fresh ones
        student = thought_forward(model, batch["student"], K=2)
        read = probe_nll(model, student.forks, [first, last], student.logits)
        student = thought_forward(model, batch["student"], K=2)
        branched = probe_nll(model, student.forks, [first, {"ids": ids, "visible": visible, "labels": labels}],
                             student.logits)
    assert torch.allclose(read, branched, atol=1e-6)


def scripted_head(model, scripts):
    """Replace the head: call i emits token scripts[row][i] for every row (one-hot logits)."""
    vocab, calls = len(model.tokenizer), [0]

    def head(h):
        i = calls[0]
        calls[0] += 1
        logits = torch.zeros(h.shape[0], vocab)
        for row, script in enumerate(scripts):
            logits[row, script[min(i, len(script) - 1)]] = 1.0
        return logits
    return head


def test_probe_readout_scores_the_first_result_of_each_segment(examples):
    model = tiny_model(examples)
    tok, enc = model.tokenizer, encoded(model, examples[:3])  # 3-step chains, K=2: segments [r1] and [r2, r3]

    def says(number):  # what one probe branch writes: max_tokens=6 ids
        ids = tok.encode(f"#### {number}")
        return ids + tok.encode(" ") * (6 - len(ids))

    for right, expected in ((True, [1.0, 1.0]), (False, [0.0, 0.0])):
        model.backbone.head = scripted_head(model, [
            says(e.results[0]) + says(e.results[1]) if right else says("9" + e.results[0]) + says(e.results[2] + "9")
            for e in enc])
        assert probe_readout(model, enc, K=2) == expected
    model.backbone.head = scripted_head(model, [says(e.results[0]) + says(e.results[2]) for e in enc])
    assert probe_readout(model, enc, K=2, which="last") == [1.0, 1.0]


def test_probe_readout_stops_at_eos_as_decoding_does(examples):
    """A branch that writes the right result and then <eos> is right, whatever follows."""
    model = tiny_model(examples)
    tok, enc = model.tokenizer, encoded(model, examples[:3])

    def says_then_stops(number):
        ids = tok.encode(f"#### {number}") + [tok.eos_id]
        return (ids + tok.encode("7") * 6)[:6]

    model.backbone.head = scripted_head(model, [says_then_stops(e.results[0]) + says_then_stops(e.results[2])
                                                for e in enc])
    assert probe_readout(model, enc, K=2, which="last") == [1.0, 1.0]


def test_the_student_starting_from_the_teachers_prompt_pass_is_exact(examples, family):
    """Stage 1's student reuses the teacher's pass over the prompt instead of its own prefill:
    the same student loss, thought states and gradients as with a separate prefill."""
    from system15.backbone import KVCache
    from system15.train.objective import prompt_prefix, sequence_forward

    model = tiny_model(examples, family)
    model.train()
    batch = LatentDistillation(tiny_config(family)).collate(model, encoded(model, examples[:5]))
    lengths = {int(n) for n in batch["prompt_len"]}
    assert len(lengths) > 1, "the case should mix prompt lengths (left vs right padding)"

    def student_pass(shared: bool):
        model.zero_grad()
        cache = KVCache.empty(model.num_layers)
        t_nll, t_final, _ = sequence_forward(model, batch["teacher"], cache=cache)
        start = prompt_prefix(cache, t_final, batch["prompt_len"]) if shared else None
        student = thought_forward(model, batch["student"], batch["K"], start=start)
        (t_nll + student.nll).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return student.nll.detach(), [t.hidden.detach() for t in student.thoughts], grads

    own, shared = student_pass(False), student_pass(True)
    torch.testing.assert_close(shared[0], own[0])
    for a, b in zip(shared[1], own[1]):
        torch.testing.assert_close(a, b)
    assert len(shared[2]) == len(own[2])
    for a, b in zip(shared[2], own[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ALIGN_RULES)
def test_a_teacher_on_part_of_the_batch(examples, family, rule):
    """stage1.teacher_rows = 0.5: the teacher runs on the first half of the rows and the rest
    run their prompt alone; the student, on every row, is exactly what it is with the teacher
    on every row, and the teacher's NLL and the alignment are those of the taught rows."""
    model = tiny_model(examples, family)
    rows = encoded(model, examples[:6])
    everyone = LatentDistillation(tiny_config(family, **{"stage1.align": rule}))
    half = LatentDistillation(tiny_config(family, **{"stage1.align": rule, "stage1.teacher_rows": 0.5}))
    batch = half.collate(model, rows)
    assert len(batch["teacher"]["ids"]) == 3 and len(batch["prompts"]["ids"]) == 3
    assert len({len(r.question) for r in rows}) > 1, "the case should mix prompt lengths"
    with torch.no_grad():
        _, got = half.loss(model, batch)
        _, all_rows = everyone.loss(model, everyone.collate(model, rows))
        _, taught = everyone.loss(model, everyone.collate(model, rows[:3]))
    assert got["student_nll"] == pytest.approx(all_rows["student_nll"], rel=1e-5)
    assert got["teacher_nll"] == pytest.approx(taught["teacher_nll"], rel=1e-5)
    assert got["align"] == pytest.approx(taught["align"], rel=1e-4)
    assert got["teacher_nll"] != pytest.approx(all_rows["teacher_nll"], rel=1e-3)


def test_prompt_grad_taught_runs_the_untaught_prompts_without_gradient(examples, monkeypatch):
    """experimental.prompt_grad = taught: the rows without a teacher run their prompts without
    gradient. The loss is the same as with "all", the gradients are not, and the prompt
    pass hands the student keys and values that carry no graph."""
    import system15.train.stage1 as stage1

    model = tiny_model(examples)
    rows = encoded(model, examples[:6])
    passes = []
    real_pass = stage1.prompt_pass
    monkeypatch.setattr(stage1, "prompt_pass", lambda m, b: passes.append(real_pass(m, b)) or passes[-1])

    def run(grad):
        obj = LatentDistillation(tiny_config(**{"stage1.teacher_rows": 0.5, "experimental.prompt_grad": grad}))
        model.zero_grad()
        loss, metrics = obj.loss(model, obj.collate(model, rows))
        loss.backward()
        cache = passes[-1][0]
        return metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None], cache.keys[0].requires_grad

    all_metrics, all_grads, all_tracked = run("all")
    taught_metrics, taught_grads, taught_tracked = run("taught")
    assert all_tracked and not taught_tracked
    for key, value in all_metrics.items():
        assert taught_metrics[key] == pytest.approx(value, rel=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(all_grads, taught_grads))


def test_teacher_rows_must_be_a_share():
    from system15.config import ConfigError, load_config

    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="stage1.teacher_rows"):
            load_config(None, [f"stage1.teacher_rows={bad}"])
    with pytest.raises(ConfigError, match="experimental.prompt_grad"):
        load_config(None, ["experimental.prompt_grad=none"])


def test_teacher_inputs_start_later_steps_from_the_teachers_segment_end(examples):
    """experimental.teacher_inputs = 1: step 2 reads P(teacher's last-layer state at the end of segment
    1), not P(step 1's own state); step 1 and examples with an empty segment 1 are untouched;
    no gradient reaches the teacher's pass through the forced input; 0 changes nothing."""
    from system15.backbone import KVCache
    from system15.train.objective import prompt_prefix, sequence_forward
    from system15.train.stage1 import teacher_inputs

    model = tiny_model(examples)
    batch = LatentDistillation(tiny_config()).collate(model, encoded(model, examples[:6]))
    seg = batch["segment_pos"].clone()
    seg[0, 0] = -1  # example 0: as if its first segment were empty
    seen = []
    model.projection.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))

    def run(chance):
        seen.clear()
        cache = KVCache.empty(model.num_layers)
        _, t_final, _ = sequence_forward(model, batch["teacher"], cache=cache)
        forced = teacher_inputs(t_final, seg, 2, chance)
        out = thought_forward(model, batch["student"], 2, start=prompt_prefix(cache, t_final, batch["prompt_len"]),
                              forced=forced)
        return t_final, out, [s for s in seen[-2:]]

    with torch.no_grad():
        _, own, (own1, own2) = run(0.0)
        t_final, forced, (in1, in2) = run(1.0)
    rows = torch.arange(len(seg))
    teacher_end = t_final[rows, seg[:, 0].clamp(min=0)]
    torch.testing.assert_close(in1, own1)  # step 1 still starts from the prompt
    torch.testing.assert_close(in2[1:], teacher_end[1:])  # step 2 from the teacher's segment end
    torch.testing.assert_close(in2[0], own2[0])  # an empty segment keeps its own state
    torch.testing.assert_close(own2, own.thoughts[0].hidden)  # (chance 0: the usual chain)
    assert not torch.allclose(in2[1:], own2[1:])
    assert not torch.allclose(forced.nll, own.nll)
    assert all(not f[1].requires_grad for f in teacher_inputs(t_final.requires_grad_(), seg, 2, 1.0)[1:])


def test_teacher_inputs_must_be_a_chance():
    from system15.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="experimental.teacher_inputs"):
        load_config(None, ["experimental.teacher_inputs=1.5"])


def test_projection_lr_scales_P_steps_only(examples, tmp_path):
    """stage1.projection_lr: one training step moves P `scale` times as far as at 1 (Adam's
    first step is lr per weight, whatever the gradient), and the backbone as far as ever; at 1
    the optimizer keeps the single group every method has."""
    from system15.layout import encode as enc
    from system15.train.loop import fit

    scale, moved = 4.0, {}
    for s in (1.0, scale):
        config = tiny_config(**{"stage1.probe": 1.0, "stage1.projection_lr": s, "stages.latent.steps": 1,
                                "stages.latent.warmup": 1, "stages.latent.weight_decay": 0.0})
        objective = LatentDistillation(config)
        model = tiny_model(examples, **{"stage1.projection_lr": s})
        objective.prepare(model)
        assert len(objective.param_groups(model)) == (1 if s == 1 else 2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, objective, [enc(model.tokenizer, e) for e in examples], config.stage("latent"), tmp_path / f"run{s}",
            quiet=True)
        step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
        moved[s] = (max(v for n, v in step.items() if n.startswith("projection.")),
                    max(v for n, v in step.items() if not n.startswith("projection.")))
    lr = tiny_config().stage("latent").lr
    assert moved[scale][0] == pytest.approx(scale * lr, rel=0.05)
    assert moved[1.0][0] == pytest.approx(lr, rel=0.05)
    assert moved[scale][1] == pytest.approx(moved[1.0][1], rel=1e-4)


def test_projection_lr_must_be_positive():
    from system15.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stage1.projection_lr"):
        load_config(None, ["stage1.projection_lr=0"])
