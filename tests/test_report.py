"""The bars a ladder's summary is judged against: each met or not by this run's own rows."""

from system15.report import bars, notes


def rows(latent, s15_acc=0.5, speedup=12.0, flops=1.6, skip=(0.2, 0.9)):
    return [
        {"method": "cot", "accuracy": 1.0},
        {"method": "nocot", "accuracy": 0.2},
        {"method": "pause", "accuracy": 0.3},
        {"method": "latent", "accuracy": latent},
        {"method": "system15", "accuracy": s15_acc, "speedup_vs_cot": speedup, "speedup_vs_cot_b8": 5.0,
         "speedup_vs_cot_b64": 4.0, "flops_reduction_vs_latent": flops,
         "skip_frac_critical": skip[0], "skip_frac_noncritical": skip[1]},
    ]


def verdicts(lines):
    return [line.endswith("**Met.**") for line in lines]


def test_every_bar_is_met_at_or_past_its_threshold():
    lines = bars(rows(latent=0.9, s15_acc=0.88, speedup=10.0, flops=1.5))
    assert len(lines) == 7 and all(verdicts(lines))
    assert "90.0% against 90.0%" in lines[0] and "+60.0 points" in lines[1] and "10.00x (batch 8: 5.00x, batch 64: 4.00x)" in lines[5]


def test_each_bar_fails_on_its_own_figure():
    assert verdicts(bars(rows(latent=0.89, s15_acc=0.89))) == [False] + [True] * 6       # below 90% of CoT
    assert verdicts(bars(rows(latent=0.9, s15_acc=0.87))) == [True] * 3 + [False] + [True] * 3  # 3 points below stage 1
    assert verdicts(bars(rows(latent=0.9, s15_acc=0.93))) == [True] * 3 + [False] + [True] * 3  # or above: not within 2
    assert verdicts(bars(rows(latent=0.9, s15_acc=0.9, flops=1.49)))[4] is False
    assert verdicts(bars(rows(latent=0.9, s15_acc=0.9, speedup=9.99)))[5] is False
    assert verdicts(bars(rows(latent=0.9, s15_acc=0.9, skip=(0.5, 0.5))))[6] is False
    low_margin = rows(latent=0.45, s15_acc=0.45)  # 15 points over pause, 25 over No-CoT
    assert verdicts(bars(low_margin))[1:3] == [False, True]


def test_bars_need_their_rows_and_ablations_get_none():
    assert bars([{"method": "cot", "accuracy": 0.9}]) == []
    assert len(bars(rows(0.5)[:4])) == 3  # no System-1.5 row: stage 1's bars only
    summary = {"rows": rows(0.5), "ablation": "configs/ablations/x.yaml"}
    assert not any("bars" in p for p in notes(summary))
    assert "bars" in notes({"rows": rows(0.5)})[0]


def test_accuracy_by_chain_shape_groups_test_records_by_their_critical_steps():
    from system15.data import Example, Step
    from system15.evaluate import Record, accuracy_by_shape
    from system15.report import markdown_table

    def example(i, shape):
        return Example("q", tuple(Step("s", "1", c == "C") for c in shape), "1", f"t:{i}")

    examples = [example(0, "nCC"), example(1, "nCC"), example(2, "nCC"), example(3, "nnC")]
    records = [Record(e.source, "1", "1", right, 3, 3, 0) for e, right in zip(examples, (True, True, False, False))]
    shapes = accuracy_by_shape(records, examples)
    assert shapes == {"nCC": 2 / 3, "nnC": 0.0} and list(shapes) == ["nCC", "nnC"]  # the most frequent first
    assert accuracy_by_shape(records, examples, most=1) is None
    table = markdown_table([{"method": "latent", "accuracy_by_shape": shapes}])
    assert "| latent | nCC 67% / nnC 0% |" in table


def test_the_stage1_average_is_reported_against_its_own_weights():
    from system15.report import markdown_table

    average = {"ema": 0.98, "step": 1500, "valid_own": 0.84, "test_own": 0.868, "valid_average": 0.89, "test_average": 0.888}
    said = notes({"rows": rows(0.888), "stage1_average": average})
    assert ("Stage-1 weight average (`train.ema` 0.98), at its last step (1500): 88.8% on test against 86.8% for the "
            "weights training ended with; 89.0% against 84.0% on validation.") in said
    assert not any("weight average" in p for p in notes({"rows": rows(0.888), "stage1_average": None}))
    table = markdown_table([{"method": "latent: x", "accuracy": 0.888, "accuracy_without_average": 0.868}])
    assert table.splitlines()[0] == "| method | accuracy | without the weight average |"
    assert table.splitlines()[2] == "| latent: x | 88.8% | 86.8% |"


def test_sync_brings_every_summary_a_page_quotes_in_step(tmp_path, monkeypatch):
    """A page quoting several summaries gets every block rewritten in one sync, not only the
    first summary's."""
    from system15.report import markdown_table, sync_pages, write_summary

    monkeypatch.chdir(tmp_path)
    page = tmp_path / "levers.md"
    page.write_text("".join(f"<!-- results: results/{n}/summary.json -->\n| stale |\n<!-- /results -->\n" for n in ("a", "b")))
    tables = {}
    for name, accuracy in (("a", 0.5), ("b", 0.7)):
        rows = [{"method": "cot", "accuracy": accuracy, "decoding_steps": 3.0}]
        write_summary(f"results/{name}", {"task": "t", "backbone": "b", "device": "d", "command": "c", "rows": rows})
        tables[name] = markdown_table(rows)
    assert sync_pages("results", to=[page]) == [page]
    assert "| stale |" not in page.read_text()
    assert all(table in page.read_text() for table in tables.values())
