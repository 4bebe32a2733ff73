from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.config import RunConfig, describe, from_flat, from_json, load_config, parse_override, to_flat, to_json
from fedfm.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path: Path) -> None:
    # Prepare
    config = RunConfig()
    path = tmp_path / "c.toml"
    # Execute
    path.write_text(config.to_toml())
    # Assert
    assert load_config(path) == config
    assert from_json(to_json(config)) == config


def test_every_problem_is_reported_at_once_with_field_value_and_range() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "train.learning-rate=-1",
                "model.task=translation",
                "lora.rank=3",
                "data.num-hospitals=many",
                "lora.dropout=1.5",
            ],
        )
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "`train.learning-rate` must be in (0, 10], got -1.0" in text
    assert ("`model.task` must be one of ['sequence-classification', 'causal-qa', 'token-classification', "
            "'instruction-tuning', 'image-classification'], got 'translation'") in text
    assert "unknown key `lora.rank`" in text and "'r'" in text
    assert "`data.num-hospitals` must be an integer, got 'many'" in text
    assert "`lora.dropout` must be in [0, 1), got 1.5" in text


def test_unknown_section_and_bad_toml_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nname = 'minilm'\n")
    with pytest.raises(ConfigError, match=r"unknown configuration key `modle.name`"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_overrides_parse_toml_values_and_kebab_keys() -> None:
    assert parse_override("train.learning-rate=1e-4") == ("train.learning-rate", 1e-4)
    assert parse_override("lora.target_modules=['query','key']") == ("lora.target-modules", ["query", "key"])
    assert parse_override("model.name=minilm") == ("model.name", "minilm")
    config = load_config(None, ["federation.num-rounds=7", "lora.target-modules=query,value"])
    assert config.federation.num_rounds == 7
    assert config.lora.target_modules == ("query", "value")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("rounds")


def test_combinations_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs a multiple-choice dataset"):
        RunConfig().replace(**{"model.task": "causal-qa"})
    with pytest.raises(ConfigError, match="`data.path` must name a file"):
        RunConfig().replace(**{"data.dataset": "csv"})
    with pytest.raises(ConfigError, match="must not exceed `data.num-hospitals`"):
        RunConfig().replace(**{"data.partitioner": "iid", "data.num-hospitals": 2, "federation.min-hospitals": 3})
    with pytest.raises(ConfigError, match=r"`data.augment` must be one of \['none', 'conclusion'\], got 'twice'"):
        RunConfig().replace(**{"data.augment": "twice"})
    with pytest.raises(ConfigError, match="`data.augment` 'conclusion' needs a dataset .*'pubmedqa'.* got 'heart_disease_uci'"):
        RunConfig().replace(**{"data.augment": "conclusion"})


def test_head_first_rounds_are_refused_where_there_is_no_head_or_the_probe_trains_it_alone() -> None:
    with pytest.raises(ConfigError, match="`federation.head-first-rounds` .2. trains a classifier head alone, but "
                                          "`model.task` 'causal-qa' has none"):
        RunConfig().replace(**{"model.task": "causal-qa", "data.dataset": "pubmedqa", "federation.head-first-rounds": 2})
    with pytest.raises(ConfigError, match="has no effect under DP-SGD's linear-probe recipe"):
        RunConfig().replace(**{"privacy.mode": "dp-sgd", "federation.head-first-rounds": 1})
    # DP-SGD on the LoRA factors may train the head first
    assert RunConfig().replace(**{"privacy.mode": "dp-sgd", "privacy.recipe": "lora",
                                  "federation.head-first-rounds": 1}).federation.head_first_rounds == 1


def test_a_logit_adjustment_tau_without_logit_adjustment_is_refused() -> None:
    with pytest.raises(ConfigError, match="`train.logit-adjustment-tau` .2.0. scales the prior of `train.class-weights` "
                                          "'logit-adjusted', but class-weights is 'balanced'"):
        RunConfig().replace(**{"train.class-weights": "balanced", "train.logit-adjustment-tau": 2.0})
    with pytest.raises(ConfigError, match="logit-adjustment-tau"):
        RunConfig().replace(**{"train.class-weights": "logit-adjusted", "train.logit-adjustment-tau": 0})


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.integers(1, 500),
    lr=st.floats(1e-6, 0.5),
    r=st.integers(1, 64),
    alpha=st.floats(0.01, 100),
    partitioner=st.sampled_from(["iid", "dirichlet", "natural"]),
)
def test_flat_form_round_trips(rounds: int, lr: float, r: int, alpha: float, partitioner: str) -> None:
    config = RunConfig().replace(
        **{"federation.num-rounds": rounds, "train.learning-rate": lr, "lora.r": r,
           "data.alpha": alpha, "data.partitioner": partitioner}
    )
    assert from_flat(to_flat(config)) == config


def test_reference_lists_every_key() -> None:
    text = describe()
    for key in to_flat(RunConfig()):
        section, name = key.split(".")
        assert f"[{section}]" in text and f"  {name} = " in text


def test_configuration_docs_match_the_dataclasses() -> None:
    # docs/configuration.md embeds `fedfm config-reference`; regenerate it when a key changes.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert describe().rstrip() in docs


def test_strategy_and_attack_sections_are_validated() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"strategy.trim-fraction": 0.5, "strategy.hetlora-weighting": "median",
                               "attack.kind": "poison", "federation.client-ranks": "4,x",
                               "attack.kinds": ["nan", "bad"], "attack.failure-rate": 1.0,
                               "federation.round-retries": -1, "federation.update-norm-limit": 0.5})
    text = str(err.value)
    assert "`strategy.trim-fraction` must be in [0, 0.5), got 0.5" in text
    assert "`strategy.hetlora-weighting` must be one of ['sparsity', 'examples'], got 'median'" in text
    assert "`attack.kind` must be one of ['sign-flip', 'scale', 'noise', 'nan'], got 'poison'" in text
    assert "`attack.kinds` must each be one of ['sign-flip', 'scale', 'noise', 'nan'], got ['nan', 'bad']" in text
    assert "`attack.failure-rate` must be in [0, 1), got 1.0" in text
    assert "`federation.round-retries` must be >= 0, got -1" in text
    assert "`federation.update-norm-limit` must be 0 (off) or > 1" in text
    assert "`federation.client-ranks` must be a list of integers" in text
    config = RunConfig().replace(**{"federation.client-ranks": [4, 8], "lora.r": 8})
    assert config.federation.client_ranks == (4, 8)
    assert from_json(to_json(config)) == config


def test_optimizer_and_dp_batch_are_validated_and_sgd_is_what_training_gets() -> None:
    import torch

    from fedfm.train import make_optimizer

    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"train.optimizer": "lamb", "train.momentum": 1.0, "privacy.batch-size": -1})
    text = str(err.value)
    assert "`train.optimizer` must be one of ['adamw', 'sgd'], got 'lamb'" in text
    assert "`train.momentum` must be in [0, 1), got 1.0" in text
    assert "`privacy.batch-size` must be >= 0 (0 uses train.batch-size), got -1" in text
    params = [torch.nn.Parameter(torch.zeros(3))]
    spec = RunConfig().replace(**{"train.optimizer": "sgd", "train.learning-rate": 2.0, "train.momentum": 0.5}).train
    sgd = make_optimizer(params, spec)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 2.0 and sgd.defaults["momentum"] == 0.5
    assert isinstance(make_optimizer(params, RunConfig().train), torch.optim.AdamW)


# --- a deployment's hospitals and classes ---------------------------------------------------------------------------


def test_deployment_keys_travel_as_flower_run_config_and_round_trip() -> None:
    # Flower's run config holds scalars: the lists arrive comma-separated, as `flwr run --run-config` gives them.
    config = from_flat({"data.hospitals": "south,east,north", "data.label-names": "no heart disease,heart disease",
                        "federation.central-evaluation": False})
    assert config.data.hospitals == ("south", "east", "north")
    assert config.data.label_names == ("no heart disease", "heart disease")
    assert from_json(to_json(config)) == config
    assert from_flat(to_flat(config)) == config


def test_every_problem_of_a_deployment_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"data.hospitals": "east,east,st mary", "model.task": "causal-qa",
                               "federation.min-hospitals": 4, "privacy.secure-aggregation": True})
    problems = err.value.problems
    assert "`data.hospitals` must be names of letters, digits, '_', '.' and '-' (as a SuperNode's node config " \
           "`hospital` gives them), got ['st mary']" in problems
    assert "`data.hospitals` must not repeat a name, got ['east', 'east', 'st mary']" in problems
    assert any(p.startswith("`data.hospitals` needs `data.label-names`") for p in problems)
    assert any(p.startswith("`data.hospitals` needs `model.task` 'sequence-classification'") for p in problems)
    assert "`federation.min-hospitals` (4) must not exceed the 3 `data.hospitals`" in problems
    assert any(p.startswith("`federation.central-evaluation` needs a global test set") for p in problems)
    assert any(p.startswith("`privacy.secure-aggregation` cannot be combined with `data.hospitals`") for p in problems)
    # The simulation's checks of data.dataset do not apply to a deployment's hospitals.
    assert not any("causal-qa' needs a multiple-choice dataset" in p for p in problems)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({}, "set `data.path` to a labelled test file the server holds, or set `federation.central-evaluation=false`"),
        ({"data.path": "test.txt"}, ("`data.path` must end in one of ['.csv', '.json', '.jsonl', '.parquet'] with "
                                    "`data.hospitals`")),
    ],
    ids=["no-global-test", "unreadable-suffix"],
)
def test_a_deployments_global_test_set_is_a_file_or_central_evaluation_is_off(settings: dict, says: str) -> None:
    base = {"data.hospitals": "north,south", "data.label-names": "negative,positive"}
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**base, **settings)
    assert any(says in p for p in err.value.problems), err.value.problems
    # Either remedy is a valid deployment.
    assert RunConfig().replace(**base, **{"federation.central-evaluation": False}).data.path == ""
    assert RunConfig().replace(**base, **{"data.path": "/srv/test.parquet"}).federation.central_evaluation


def test_label_names_are_checked_without_hospitals_too() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"data.label-names": ["flu"]})
    assert err.value.problems == ["`data.label-names` must name at least two classes, got ['flu']"]
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"data.label-names": ["flu", "flu", " "]})
    assert err.value.problems == [
        "`data.label-names` must be non-empty names without commas, got ['flu', 'flu', ' ']",
        "`data.label-names` must not repeat a name, got ['flu', 'flu', ' ']",
    ]
    # A csv simulation may fix its class order with label names, and needs no hospitals for it.
    assert RunConfig().replace(**{"data.dataset": "csv", "data.path": "x.csv",
                                  "data.label-names": "b,a"}).data.label_names == ("b", "a")


def test_choices_live_in_the_field_types_and_are_checked_generically() -> None:
    from dataclasses import fields
    from typing import Literal, get_args, get_origin, get_type_hints

    from fedfm.config import DATASETS, FILE_DATASETS, SECTIONS, DataSpec

    # The tuples other modules import are read from the types: one list, written once.
    assert get_args(get_type_hints(DataSpec)["dataset"]) == DATASETS and set(FILE_DATASETS) <= set(DATASETS)
    # Every Literal field refuses a value outside its type, with the allowed list.
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            typ = get_type_hints(cls)[f.name]
            if get_origin(typ) is Literal:
                key = f"{section}.{f.name.replace('_', '-')}"
                with pytest.raises(ConfigError) as err:
                    RunConfig().replace(**{key: "no-such-choice"})
                assert f"`{key}` must be one of {list(get_args(typ))}, got 'no-such-choice'" in err.value.problems


def test_float_ranges_sit_beside_their_fields() -> None:
    from dataclasses import fields

    from fedfm.config import SECTIONS

    within = {f"{s}.{f.name}": f.metadata["within"] for s, cls in SECTIONS.items() for f in fields(cls)
              if "within" in f.metadata}
    assert within["train.learning_rate"] == "(0, 10]" and within["lora.dropout"] == "[0, 1)"
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"privacy.noise-multiplier": -1, "strategy.eta": -1, "data.test-fraction": 1})
    assert err.value.problems == [
        "`data.test-fraction` must be in (0, 1), got 1.0",
        "`strategy.eta` must be >= 0 (0 picks each optimizer's own), got -1.0",
        "`privacy.noise-multiplier` must be >= 0 (0 calibrates it), got -1.0",
    ]
