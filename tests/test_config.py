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
    ({"text": False, "text-prior": True}, "text-prior needs text = true"),
    ({"max-len": 20, "window-stride": 25}, "window-stride must be >= 0 and at most max-len"),
])
def test_bad_values_are_named(table, message):
    with pytest.raises(ValueError) as error:
        PollenConfig.from_flat(table)
    assert message in str(error.value)


# -- --help that teaches (issue 15) -------------------------------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import fields  # noqa: E402

from common.config import SECTIONS, describe, settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _help(module: str) -> subprocess.CompletedProcess:
    """``python -m MODULE --help`` with Python's import log on stderr."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # client.adapt imports torch


def test_every_setting_has_one_line_of_help_with_default_and_values():
    for section, key, f in settings():
        line = describe(f, f.default)
        assert f.metadata["help"].strip() and "\n" not in line, key
        assert "[default: " in line and line.endswith("]"), key
    assert len(settings()) == sum(len(fields(k)) for k in SECTIONS.values())


def test_run_help_lists_every_setting_and_imports_no_model_library():
    result = _help("simulations.run")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert text.startswith("usage: python -m simulations.run")
    for _, key, f in settings():
        assert f"--{key}" in text
        assert " ".join(f.metadata["help"].split()) in text, key
    assert "[default: 5; >= 1]" in text  # num-rounds
    assert "softmax | sampled" in text  # a setting with a closed set of values
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "peft", "flwr", "ray", "pandas"}, imported


def test_every_command_line_flag_has_help():
    """The commands' own flags (beside the config table's) say what they do in --help."""
    import ast

    silent = []
    for path in sorted(p for floor in ("client", "server", "common", "simulations") for p in (ROOT / floor).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                    and not any(k.arg == "help" for k in node.keywords)):
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not silent, silent


def test_adapt_help_shows_only_the_settings_it_uses():
    result = _help("client.adapt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m client.adapt")
    for key in ("num-rounds", "min-clients", "secagg", "aggregator", "data-dir", "clients-per-platform",
                "run-dir"):
        assert f"--{key} " not in result.stdout, key
    for key in ("lora-rank", "batch-size", "dp-epsilon", "threads"):
        assert f"--{key} " in result.stdout, key


def test_settings_without_a_flag_keep_the_commands_defaults():
    parser = argparse.ArgumentParser()
    add_flags(parser, PollenConfig().replace(**{"num-rounds": 2}), scopes=("model",))
    config = from_args(parser.parse_args(["--lora-rank", "4"]))
    assert config.model.lora_rank == 4 and config.federation.num_rounds == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-rounds", "3"])
