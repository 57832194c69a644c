"""The run's plot: test solid, validation dashed, both in the legend, each platform's best validation round marked."""

from server.record import RunRecord


def metrics(test: float, valid: float) -> dict:
    return {"test-ndcg@10": test, "valid-ndcg@10": valid}


def test_plot_shows_test_solid_validation_dashed_and_the_best_validation_round(tmp_path):
    record = RunRecord(tmp_path, {}, 3, log=lambda line: None)
    valid = {"shop": [0.10, 0.30, 0.25, 0.20], "video": [0.05, 0.10, 0.15, 0.40]}
    for rnd in range(4):
        record.add_evaluation(rnd, {n: metrics(v[rnd] - 0.01, v[rnd]) for n, v in valid.items()})
    assert (tmp_path / "ndcg_per_round.png").stat().st_size > 1000

    ax = record.figure().axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    for name in valid:
        assert lines[f"{name} test"].get_linestyle() == "-"
        assert lines[f"{name} validation"].get_linestyle() == "--"
        assert f"{name} test" in legend and f"{name} validation" in legend
    assert legend.count("best validation round") == 1
    stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert sorted((float(s.get_xdata()[0]), float(s.get_ydata()[0])) for s in stars) == [(1.0, 0.30), (3.0, 0.40)]


def test_round_zero_is_a_candidate_only_with_the_text_prior(tmp_path):
    """The untrained start is MiniLM's zero-shot ranking with ``text-prior`` (a model worth serving, as
    common.train.fit keeps epoch 0); without it, a random head that is never selected."""
    valid = [0.40, 0.30, 0.35]
    chosen = {}
    for prior in (False, True):
        record = RunRecord(tmp_path / str(prior), {"text-prior": prior}, 2, log=lambda line: None)
        for rnd, v in enumerate(valid):
            record.add_evaluation(rnd, {"shop": metrics(v / 2, v)})
        chosen[prior] = record.selected()["shop"]
    assert chosen[False]["round"] == 2 and chosen[False]["test"] == {"ndcg@10": 0.175}
    assert chosen[True]["round"] == 0 and chosen[True]["test"] == {"ndcg@10": 0.20}
