"""One name per setting: the pyproject table, the dataclasses and the flags agree; bad values get clear errors."""

import argparse
import tomllib
from pathlib import Path

import pytest

from common.config import PollenConfig, add_flags, from_args


def test_pyproject_table_equals_dataclass_defaults():
    table = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert table["tool"]["flwr"]["app"]["config"] == PollenConfig().to_flat()


def test_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--num-rounds", "7", "--item-ids", "false", "--fusion", "0.3"])
    config = from_args(args)
    assert config.federation.num_rounds == 7 and config.model.item_ids is False
    assert config.model.fusion_theta() == 0.3


@pytest.mark.parametrize("table, message", [
    ({"num-round": 3}, "unknown config key(s) ['num-round']"),
    ({"batch-size": "many"}, "config 'batch-size': expected int, got 'many'"),
    ({"batch-size": 2.5}, "config 'batch-size': expected int"),
    ({"fusion": "1.5"}, "config 'fusion': expected 'learned' or a number in [0, 1]"),
    ({"platforms": "video"}, "config 'platforms': expected name=path pairs"),
    ({"text": False, "item-ids": False}, "a model needs text or item-ids"),
    ({"loss": "bpr"}, "loss must be 'softmax' or 'sampled'"),
])
def test_bad_values_are_named(table, message):
    with pytest.raises(ValueError) as error:
        PollenConfig.from_flat(table)
    assert message in str(error.value)
