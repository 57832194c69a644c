"""A user's mistakes, one test per class (issue 14): settings out of range, values out of range in data, files
that are damaged or do not fit, metrics that are not finite, run folders in use or holding results, the one-line
ending of every driver, and a federation that stops at once, naming the platform, when a node fails.

The simulations/mistakes.py script measures the same classes end to end, as commands (exit, lines, seconds).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common import cli
from common.checks import NonFiniteMetric, check_tensors, load_tensors, load_torch
from common.config import PollenConfig
from common.data.loaders import load_platform
from common.data.schema import DataError
from common.data.sources import load_split
from common.errors import ConfigError, FileProblem, NodeFailed, UserError, node_error_reason, parse_node_error
from common.files import claim_run_dir, write_json
from simulations.mistakes import few_interactions, ratings, set_cell, write_platforms

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def platforms(tmp_path_factory) -> Path:
    return write_platforms(tmp_path_factory.mktemp("platforms"))


def broken(root: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "items.csv").write_bytes((root / "shop-export" / "items.csv").read_bytes())
    lines = (root / "shop-export" / "interactions.csv").read_text().splitlines()
    (folder / "interactions.csv").write_text("\n".join(edit(lines)) + "\n")
    return folder


# -- settings: every number has a range, checked before work -------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("threads", -1, "threads must be >= 0"), ("device", "bogus", "device must be"),
    ("min-clients", -1, "min-clients must be >= 0"), ("lr", float("inf"), "'lr': expected a finite number"),
    ("round-timeout", 0.0, "round-timeout"), ("dropout", 1.5, "dropout"),
    ("platforms", "a=x,a=y", "must be unique"), ("platforms", "../a=x", "letters, digits"),
])
def test_settings_out_of_range_are_config_errors(key, value, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        PollenConfig().replace(**{key: value})


def test_preflight_refuses_what_validate_cannot_see(platforms):
    from common.preflight import check_platforms, check_settings, resolve_min_clients

    with pytest.raises(ConfigError, match="needs text = true"):
        check_settings(PollenConfig().replace(**{"text": False}), federation=True)
    with pytest.raises(ConfigError, match="base-model"):
        check_settings(PollenConfig().replace(**{"base-model": "/no/such/model"}))
    two = PollenConfig().replace(**{"data-dir": str(platforms), "platforms": "shop=shop-export,forum=forum-export"})
    said = []
    assert resolve_min_clients(two, said.append).federation.min_clients == 2  # the default: every client
    assert "min-clients 2" in said[0]
    with pytest.raises(ConfigError, match="min-clients' is 3 but the run has only 2"):
        resolve_min_clients(two.replace(**{"min-clients": 3}))
    with pytest.raises(DataError, match="no-such-folder: not a folder"):
        check_platforms(two.replace(**{"platforms": "shop=shop-export,forum=no-such-folder"}))


# -- values in data: every number a loader reads has a range -------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (set_cell(3, "timestamp", "1" * 24), "line 3, column 'timestamp': timestamp '1111"),
    (set_cell(3, "timestamp", "-99999999999999"), "out of range"),
    (set_cell(3, "timestamp", "yesterday"), "unparsable timestamp 'yesterday'"),
    (ratings("-50"), "line 3, column 'rating': rating '-50' out of range"),
    (ratings("inf"), "rating 'inf' out of range"),
    (ratings("1e300"), "rating '1e300' out of range"),
    (ratings("nan"), "non-numeric rating 'nan'; expected a number \\(finite"),
])
def test_out_of_range_values_name_file_line_and_column(platforms, tmp_path, edit, words):
    folder = broken(platforms, tmp_path, edit)
    with pytest.raises(DataError, match=words) as caught:
        load_platform(folder)
    assert str(folder / "interactions.csv") in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("date, seconds", [("1500-01-01", -14831769600), ("2300-01-01T00:00:00", 10413792000),
                                           ("0001-01-01", -62135596800)])
def test_dates_outside_pandas_nanosecond_range_load(platforms, tmp_path, date, seconds):
    data = load_platform(broken(platforms, tmp_path, set_cell(2, "timestamp", date)))
    assert data.interactions["timestamp"].iloc[0] == seconds


def test_data_where_no_user_has_three_interactions_is_refused(platforms, tmp_path):
    folder = broken(platforms, tmp_path, few_interactions)
    with pytest.raises(DataError, match="no user has 3 or more interactions"):
        load_split(PollenConfig().data, "shop", str(folder))


def test_a_folder_name_that_is_not_utf8_is_one_printable_error(platforms, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(raw)
    for name in ("items.csv", "interactions.csv"):
        with open(raw + b"/" + name.encode(), "wb") as out:
            out.write((platforms / "shop-export" / name).read_bytes())
    with pytest.raises(DataError, match=r"caf\\xe9: the folder's path is not valid UTF-8") as caught:
        load_platform(os.fsdecode(raw))
    str(caught.value).encode("utf-8")  # printable


# -- files: damaged, foreign or non-finite, named in one line -------------------------------------------
def test_tensor_files_are_checked_for_readability_keys_shapes_and_finite_values(tmp_path):
    good = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    file = tmp_path / "t.safetensors"
    save_file(good, str(file))
    check_tensors(load_tensors(file), file, {"a": (2, 3), "b": (4,)})
    save_file({"a": torch.full((2, 3), float("nan")), "b": torch.ones(4)}, str(file))
    with pytest.raises(FileProblem, match=r"t.safetensors: unusable adapter: a: 6 of 6 values are NaN"):
        check_tensors(load_tensors(file), file, what="adapter")
    with pytest.raises(FileProblem, match=r"a: shape \[2, 3\], expected \[3, 2\]"):
        check_tensors(good, file, {"a": (3, 2), "b": (4,)})
    with pytest.raises(FileProblem, match="1 missing"):
        check_tensors(good, file, {"a": (2, 3), "b": (4,), "c": (1,)})
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(FileProblem, match="t.safetensors: not a readable safetensors"):
        load_tensors(file)


def test_torch_files_load_only_tensors_and_plain_values(tmp_path):
    file = tmp_path / "state.pt"
    torch.save({"x": torch.ones(2), "n": 3, "rng": torch.get_rng_state()}, file)
    assert load_torch(file)["n"] == 3
    file.write_bytes(pickle.dumps(Path("/etc/passwd")))  # an object: never unpickled
    with pytest.raises(FileProblem, match="state.pt: not a readable") as caught:
        load_torch(file)
    assert "weights_only=False" not in str(caught.value)


def test_adapt_refuses_a_nan_adapter_and_one_for_another_model(tiny_bert, platforms, tmp_path):
    from client.adapt import adapt, read_adapter
    from common.model.encoder import TextEncoder

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "max-steps": 1})
    folder = tmp_path / "adapter"
    TextEncoder(config.model, seed=0).save_adapter(folder)
    state = read_adapter(folder)
    file = folder / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(file))
    with pytest.raises(FileProblem, match="adapter_model.safetensors: unusable adapter: .*NaN"):
        read_adapter(folder)
    split = load_split(config.data, "shop", str(platforms / "shop-export"))
    with pytest.raises(FileProblem, match="keys differ"):
        adapt(split, config.replace(**{"lora-layers": 2}), state, 1, adapter_source=str(file))


@pytest.mark.parametrize("damage, words", [
    ("header", "adapter.safetensors: not a readable safetensors"),
    ("no-round", "state.json: key 'round' missing"),
    ("no-state", "state.json: missing, so the checkpoint is incomplete"),
    ("not-json", "state.json: not readable JSON"),
])
def test_damaged_checkpoints_name_the_file(tmp_path, damage, words):
    from flwr.app import ArrayRecord

    from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, Checkpoint(1, ArrayRecord({"a": torch.ones(2, 2)}), "f", {}, {
        "evaluations": {}, "training": {}, "round_seconds": {}, "failures": {}}, PollenConfig().to_flat(), {}))
    folder = tmp_path / "checkpoint"
    assert load_checkpoint(tmp_path).round == 1
    if damage == "header":
        (folder / "adapter.safetensors").write_bytes(b"\x00" * 4)
    elif damage == "no-round":
        state = (folder / "state.json").read_text().replace('"round"', '"rnd"')
        (folder / "state.json").write_text(state)
    elif damage == "no-state":
        (folder / "state.json").unlink()
    else:
        (folder / "state.json").write_text("{")
    with pytest.raises(FileProblem, match=words):
        load_checkpoint(tmp_path)


# -- metrics: never NaN or infinite -------------------------------------------------------------------
def test_nan_scores_are_an_error_not_an_infinite_ndcg(platforms):
    from common.evaluate import evaluate

    split = load_split(PollenConfig().data, "shop", str(platforms / "shop-export"))
    nan = lambda histories: torch.full((len(histories), split.num_items + 1), float("nan"))  # noqa: E731
    with pytest.raises(NonFiniteMetric, match="shop test: the model scored items NaN"):
        evaluate(nan, split, "test")


def test_json_never_holds_nan_or_infinity(tmp_path):
    write_json(tmp_path / "m.json", {"ndcg@10": float("inf"), "x": [float("nan"), 1.0], "n": np.float64(2)})
    assert (tmp_path / "m.json").read_text().split() == ['{', '"ndcg@10":', 'null,', '"x":', '[', 'null,', '1.0',
                                                         '],', '"n":', '2.0', '}']


# -- run folders: locked while written, never silently reused ---------------------------------------------
def test_run_folder_with_results_is_refused_resumed_or_overwritten(tmp_path):
    run = tmp_path / "run"
    assert claim_run_dir(str(run)) == run.resolve()
    (run / "results.json").write_text("{}")
    with pytest.raises(FileProblem, match="holds earlier results .*results.json.* --overwrite"):
        claim_run_dir(str(run), resume_marker="checkpoint/state.json")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text("{}")
    claim_run_dir(str(run), resume_marker="checkpoint/state.json")  # resumable: accepted, kept
    assert (run / "results.json").exists()
    claim_run_dir(str(run), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".pollen.lock"]


def test_a_run_folder_another_process_writes_is_refused(tmp_path):
    run = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.files import claim_run_dir; "
                               f"claim_run_dir({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileProblem, match=f"another run is writing this run folder \\(process {holder.pid}\\)"):
            claim_run_dir(str(run))
    finally:
        holder.kill()
        holder.wait()
    claim_run_dir(str(run))  # the lock died with its process: no stale lock


# -- the one-line ending ----------------------------------------------------------------------------------
def test_user_error_is_one_line_exit_2_and_debug_shows_the_traceback(capsys):
    def main(argv):
        raise DataError("/d/interactions.csv", "unparsable timestamp 'x'; expected a time", line=3,
                        column="timestamp")

    with pytest.raises(SystemExit) as ended:
        cli.run(main, [])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: /d/interactions.csv, line 3, column 'timestamp': unparsable timestamp 'x'; expected a time\n"
    with pytest.raises(DataError):
        cli.run(main, ["--debug"])
    with pytest.raises(SystemExit) as ended:
        cli.run(lambda argv: (_ for _ in ()).throw(NodeFailed("round 1 train: node 7 (video) failed: bug")), [])
    assert ended.value.code == 1


def test_a_node_error_reply_names_the_platform_and_whether_it_is_the_users():
    reason = node_error_reason("video", DataError("/v/items.csv", "item 'a' has empty text", line=4))
    assert parse_node_error(reason) == ("video", True, "/v/items.csv, line 4: item 'a' has empty text")
    assert parse_node_error(node_error_reason("shop", KeyError("k")))[:2] == ("shop", False)
    assert issubclass(DataError, UserError) and issubclass(ConfigError, ValueError)


def test_driver_stops_on_a_bad_setting_before_any_work_in_one_line(platforms, tmp_path):
    """The real command: exit 2, one line, and no run folder, Ray or model started."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "simulations.run", "--data-dir", str(platforms), "--platforms",
                           "shop=shop-export,forum=no-such", "--run-dir", str(tmp_path / "run")],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {platforms / 'no-such'}: not a folder; expected a platform "
                                                "folder holding the data files"]
    assert "Traceback" not in done.stdout + done.stderr and "ray" not in (done.stdout + done.stderr).lower()


@pytest.mark.parametrize("flags, line", [
    (["--platform", "shoe"], "error: --platform: 'shoe' is not one of the platforms ['shop']"),
    (["--platform", "shop", "--methods", "federated"],
     "error: --platform: only with methods that train each platform alone (sasrec-id, local-only, "
     "local-only-lora) or seed-free ones; got ['federated']"),
    (["--jobs", "0"], "error: --jobs: expected at least 1, got 0")])
def test_benchmark_job_flags_are_checked_before_any_work(platforms, tmp_path, flags, line):
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "simulations.benchmark", "--data-dir", str(platforms),
                           "--platforms", "shop=shop-export", "--methods", "local-only", *flags,
                           "--run-dir", str(tmp_path / "run")],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists()


# -- a federation: a failing node is named and the run stops at once --------------------------------------
def test_a_failing_node_stops_the_federation_at_once_naming_its_platform(tiny_bert, platforms, tmp_path):
    """No preflight here (simulate is called directly): one platform's data breaks on its node."""
    from client.app import app as client_app
    from tests.simulated import simulate

    bad = broken(platforms, tmp_path, set_cell(3, "timestamp", "yesterday"))
    config = PollenConfig().replace(**{
        "base-model": tiny_bert, "lora-layers": 1, "num-rounds": 3, "max-steps": 1, "threads": 1,
        "data-dir": str(platforms), "platforms": f"shop={bad},forum=forum-export",
        "run-dir": str(tmp_path / "run"), "round-timeout": 600.0})
    with pytest.raises(NodeFailed) as caught:
        simulate(config, client_app, num_supernodes=2)
    message = str(caught.value)
    assert message.startswith("round 0 evaluate: node ") and "(shop) failed: " in message
    assert "line 3, column 'timestamp': unparsable timestamp 'yesterday'" in message and caught.value.user_error
    assert not (tmp_path / "run" / "checkpoint").exists()  # stopped in round 0: nothing ran on without shop


def test_waiting_for_nodes_says_so_and_gives_up_after_round_timeout(tiny_bert, platforms, tmp_path, monkeypatch):
    from client.app import app as client_app
    from server import rounds
    from tests.simulated import simulate

    monkeypatch.setattr(rounds, "NOTICE_SECONDS", 1.0)
    config = PollenConfig().replace(**{
        "base-model": tiny_bert, "lora-layers": 1, "num-rounds": 1, "min-clients": 3, "round-timeout": 4.0,
        "data-dir": str(platforms), "platforms": "shop=shop-export,forum=forum-export",
        "run-dir": str(tmp_path / "run")})
    with pytest.raises(NodeFailed, match=r"round 0: 2 node\(s\) connected after 4s \(round-timeout\), "
                                         "min-clients is 3") as caught:
        simulate(config, client_app, num_supernodes=2)
    notices = [line for line in caught.value.server_log if "waiting for nodes to connect" in line]
    assert notices and notices[0].startswith("round 0: waiting for nodes to connect: 2 of min-clients 3 (")


def test_a_node_checks_that_the_superlink_speaks_what_it_will_before_starting(tmp_path):
    """A TLS SuperLink (Flower's own): --insecure is refused in one line, the operator's CA passes, another CA
    is named; an insecure SuperLink refuses a TLS node's CA."""
    from client.launch import check_superlink
    from common.processes import free_port, start_process, stop_process, wait_for_port
    from server.certs import make_server_cert
    from server.launch import superlink_command

    make_server_cert(tmp_path / "certs", "127.0.0.1")
    make_server_cert(tmp_path / "other", "127.0.0.1")
    for tls in (True, False):
        port = free_port()
        link = start_process(superlink_command("127.0.0.1", port, tmp_path / "certs" if tls else None,
                                               tmp_path / f"db{tls}" / "state.db"), tmp_path / "link.log")
        try:
            wait_for_port("127.0.0.1", port, 60, link)
            if tls:
                with pytest.raises(ConfigError, match="--insecure, but the SuperLink at 127.0.0.1:.* speaks TLS"):
                    check_superlink("127.0.0.1", port, None)
                check_superlink("127.0.0.1", port, tmp_path / "certs" / "ca.crt")
                with pytest.raises(FileProblem, match="other/ca.crt: the SuperLink at .* certificate this CA does "
                                                      "not verify"):
                    check_superlink("127.0.0.1", port, tmp_path / "other" / "ca.crt")
            else:
                with pytest.raises(ConfigError, match="does not speak TLS"):
                    check_superlink("127.0.0.1", port, tmp_path / "certs" / "ca.crt")
                check_superlink("127.0.0.1", port, None)
        finally:
            stop_process(link)
