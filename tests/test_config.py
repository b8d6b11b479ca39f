"""Impossible settings are refused by load_config before any work starts, with a message that
names the source (file or overrides) and the key; the CLI turns them into exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from system15.cli import main
from system15.config import ConfigError, load_ablation, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def refused(recipe_path, overrides=(), *must_name: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(recipe_path, list(overrides))
    message = str(err.value)
    for part in must_name:
        assert part in message, f"{part!r} not named in: {message}"
    assert "\n" not in message
    return message


def test_demo_recipe_loads():
    import yaml

    config, raw = load_config(DEMO), yaml.safe_load(DEMO.read_text())
    assert config.name == raw["name"] and config.stage("cot").steps == raw["stages"]["cot"]["steps"]


@pytest.mark.parametrize("text, key", [
    ("architecture:\n  lambda_depth: 1.5\n", "architecture.lambda_depth"),
    ("architecture:\n  lambda_depth: -0.1\n", "architecture.lambda_depth"),
    ("eval:\n  sweep_depth: [0.3, 1.2]\n", "eval.sweep_depth"),
    ("architecture:\n  K: -1\n", "architecture.K"),
    ("backbone:\n  source: onnx\n", "backbone.source"),
    ("backbone:\n  source: hf\n  path: /no/such/model/folder\n", "backbone.path"),
    ("backbone:\n  source: hf\n", "backbone.path"),
    ("architecture:\n  lamda_depth: 0.5\n", "architecture.lamda_depth"),
    ("shortcut:\n  lamda_depth: 0.5\n", "shortcut.lamda_depth"),
    ("tsak:\n  name: synthetic\n", "tsak"),
    ("stages:\n  cot: {stepz: 10}\n", "stages.cot.stepz"),
    ("stages:\n  cot: {steps: 0}\n", "stages.cot.steps"),
    ("stages:\n  cot: 5\n", "stages.cot"),
    ("stages:\n  cto: {steps: 5}\n", "stages.cto"),
    ("architecture:\n  K: two\n", "architecture.K"),
    ("architecture:\n  K: 2.5\n", "architecture.K"),
    ("architecture:\n  K: true\n", "architecture.K"),
    ("stage1:\n  alpha: .nan\n", "stage1.alpha"),
    ("stage1:\n  align: segmnt\n", "stage1.align"),
    ("methods: cot\n", "methods"),
    ("methods: [cot, sytem15]\n", "methods"),
    ("task:\n  n_train: -5\n", "task.n_train"),
    ("train:\n  steps: 10\n", "train"),
])
def test_impossible_value_in_file_names_file_and_key(tmp_path, text, key):
    path = recipe(tmp_path, text)
    refused(path, (), str(path), key)


def test_unknown_key_suggests_the_known_one(tmp_path):
    message = refused(recipe(tmp_path, "architecture:\n  lamda_depth: 0.5\n"), (), "did you mean 'lambda_depth'")
    assert "unknown setting" in message
    old = refused(recipe(tmp_path, "shortcut:\n  lamda_depth: 0.5\n"), (), "did you mean 'shortcut.lambda_depth'")
    assert "now architecture.lambda_depth" in old


def test_a_recipe_in_the_old_layout_loads_with_a_warning_naming_each_move(tmp_path):
    """Settings were grouped by owner (config.RENAMED): an older recipe, ablation or run
    record means the same run, and says where its keys live now."""
    old = recipe(tmp_path, "latent:\n  K: 3\n  align: codi\n  pause_K: 4\n  warm_start: 0.2\n"
                           "shortcut:\n  mu: 2.0\n  kv_policy: skip\n")
    with pytest.warns(FutureWarning, match="latent.align -> stage1.align"):
        config = load_config(old, ["shortcut.adapter_dim=8"])
    assert (config.architecture.K, config.stage1.align, config.baselines.pause_K, config.experimental.warm_start,
            config.stage2.mu, config.architecture.kv_policy, config.architecture.adapter_dim) == (3, "codi", 4, 0.2, 2.0, "skip", 8)
    new = load_config(None, ["architecture.K=3", "stage1.align=codi", "baselines.pause_K=4", "experimental.warm_start=0.2",
                             "stage2.mu=2.0", "architecture.kv_policy=skip", "architecture.adapter_dim=8"])
    assert new.to_dict() == config.to_dict()


def test_every_old_key_has_a_home_in_the_schema():
    from system15.config import RENAMED, RunConfig

    config = RunConfig()
    for old, new in RENAMED.items():
        section, key = new.split(".")
        assert hasattr(getattr(config, section), key), (old, new)


def test_direct_construction_is_checked_too():
    """The schema checks every construction, `dataclasses.replace` included, not only load_config."""
    import dataclasses

    from system15.config import TrainConfig

    with pytest.raises(ConfigError, match="decay"):
        TrainConfig(decay="step")
    with pytest.raises(ConfigError, match="steps"):
        dataclasses.replace(TrainConfig(), steps=0)


def test_help_lists_the_choices_of_every_literal_setting():
    from system15.config import help_lines

    text = "\n".join(help_lines())
    assert "stage1.align='segment'  [segment | codi | segment_layers]" in text
    assert "architecture.kv_policy='fill'  [fill | skip]" in text


@pytest.mark.parametrize("override, key", [
    ("architecture.lambda_depth=1.5", "architecture.lambda_depth"),
    ("eval.sweep_depth=[0.5, 2]", "eval.sweep_depth"),
    ("architecture.K=-1", "architecture.K"),
    ("backbone.source=tpu", "backbone.source"),
    ("latent.KK=3", "latent.KK"),
    ("stage1.probe_results=first", "stage1.probe_results"),
    ("stages.latent.ema=1", "stages.latent.ema"),
])
def test_impossible_override_names_overrides_and_key(override, key):
    refused(None, [override], "overrides", key)
    refused(DEMO, [override], str(DEMO), "overrides", key)


def test_hf_source_with_missing_path_is_refused_before_loading(tmp_path):
    missing = tmp_path / "not-here"
    refused(None, ["backbone.source=hf", f"backbone.path={missing}"], "backbone.path", str(missing),
            "neither an existing folder nor a hub id")


def test_hf_source_takes_a_hub_id_without_looking_it_up():
    assert load_config(None, ["backbone.source=hf", "backbone.path=openai-community/gpt2"]).backbone.path == "openai-community/gpt2"


def test_missing_recipe(tmp_path):
    refused(tmp_path / "nope.yaml", (), str(tmp_path / "nope.yaml"), "not found")


@pytest.mark.parametrize("text", ["architecture:\n  K: [1\n", "a: b: c\n", "architecture:\n\tK: 1\n"])
def test_malformed_yaml_names_file_and_line(tmp_path, text):
    refused(recipe(tmp_path, text), (), "recipe.yaml", "not valid YAML", "line ")


def test_top_level_must_be_a_mapping(tmp_path):
    refused(recipe(tmp_path, "- cot\n- latent\n"), (), "recipe.yaml", "mapping")


def test_malformed_override():
    refused(None, ["architecture.K"], "architecture.K", "key=value")
    refused(None, ["architecture.K=[1"], "architecture.K=[1", "not valid YAML")


def test_float_written_as_yaml_text_is_read_as_number(tmp_path):
    """PyYAML reads `1e-3` as a string; a float field takes it as the number it means."""
    config = load_config(recipe(tmp_path, "stages:\n  cot: {lr: 1e-3, steps: 7}\n"))
    assert config.stage("cot").lr == pytest.approx(1e-3) and isinstance(config.stage("cot").lr, float)


def test_saved_config_loads_back(tmp_path):
    config = load_config(DEMO, ["architecture.K=3"])
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json").to_dict() == config.to_dict()


# -- the CLI: exit code 2 and one line, before any work ------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["train", "--method", "cot", "--recipe", str(DEMO), "architecture.lambda_depth=1.5"], "architecture.lambda_depth"),
    (["bench", "--recipe", str(DEMO), "architecture.K=-1"], "architecture.K"),
    (["bench", "--recipe", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
    (["data", "--out", "unused.txt", "--recipe", str(DEMO), "backbone.source=hf", "backbone.path=/no/such"], "backbone.path"),
    (["train", "--method", "cot", "--recipe", str(DEMO), "shortcut.lamda_depth=0.3"], "lamda_depth"),
    (["train", "--method", "cot", "--recipe", str(DEMO), "architecture.lamda_depth=0.3"], "lamda_depth"),
])
def test_cli_reports_config_errors_with_exit_code_2(capsys, tmp_path, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)  # nothing may be written: a run would create runs/ here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("system15: ") and named in err
    assert list(tmp_path.iterdir()) == []


def test_cli_malformed_recipe(capsys, tmp_path):
    bad = recipe(tmp_path, "architecture:\n  K: [1\n")
    assert main(["bench", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "not valid YAML" in err


ABLATION = "name: levers\nrecipe: r.yaml\nmethod: latent\nvariants:\n"


@pytest.mark.parametrize("text,named", [
    (ABLATION + "  ok: []\nvarints: {}\n", "varints: unknown key (did you mean 'variants'?)"),
    (ABLATION + "  fast: [stages.latent.lr=-1]\n", "variants.fast"),
    (ABLATION + "  fast: stages.latent.lr=1\n", "variants.fast: expected a list"),
    (ABLATION + "  harder: [task.n_steps=5]\n", "variants.harder: may not change task"),
    ("name: levers\nrecipe: r.yaml\nmethod: latentt\nvariants: {a: []}\n", "method: unknown method"),
    ("name: levers\nrecipe: r.yaml\nmethod: latent\n", "variants: missing"),
    (ABLATION.replace("variants:", "base: [stages.latent.lr=-1]\nvariants:") + "  a: []\n", "a.yaml: base: "),
    (ABLATION.replace("variants:", "base: stages.latent.lr=1\nvariants:") + "  a: []\n", "base: expected a list"),
    (ABLATION.replace("variants:", "base: [task.n_steps=5]\nvariants:") + "  a: []\n", "base: may not change task"),
])
def test_ablation_file_errors_name_the_file_and_key(tmp_path, text, named):
    (tmp_path / "r.yaml").write_text("name: r\n")
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_ablation(tmp_path / "a.yaml")
    assert str(tmp_path / "a.yaml") in str(err.value) and named in str(err.value)


def test_an_ablation_base_lies_under_every_variant(tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\n")
    (tmp_path / "a.yaml").write_text(ABLATION.replace("variants:", "base: [stages.latent.lr=0.002, architecture.K=3]\nvariants:")
                                     + "  as based: []\n  own K: [architecture.K=4]\n")
    ablation = load_ablation(tmp_path / "a.yaml")
    based, own = ablation.config("as based"), ablation.config("own K")
    assert based.stage("latent").lr == own.stage("latent").lr == 0.002
    assert (based.architecture.K, own.architecture.K) == (3, 4)  # a variant's own override wins


def test_shipped_ablation_files_load():
    for path in sorted((DEMO.parent / "ablations").glob("*.yaml")):
        ablation = load_ablation(path)
        assert ablation.variants and all(ablation.config(v) for v in ablation.variants)


def test_timing_rounds_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="eval.timing_rounds"):
        load_config(None, ["eval.timing_rounds=0"])


def test_the_mu_grid_holds_distinct_weights():
    for bad in ("[1,-1]", "[2,2]"):
        with pytest.raises(ConfigError, match="stage2.mu_grid"):
            load_config(None, [f"stage2.mu_grid={bad}"])
    assert load_config(None, ["stage2.mu_grid=[0.8,3.2]"]).stage2.mu_grid == [0.8, 3.2]
