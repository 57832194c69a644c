"""Leave-one-out by time: the right items are held out, ties keep file order, nothing leaks into training."""

import numpy as np
import pandas as pd

from common.data.schema import PlatformData
from common.data.split import leave_one_out
from common.train import training_pairs


def _platform(rows):
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter.insert(0, "platform", "p")
    inter["rating"] = np.nan
    items = pd.DataFrame({"item": ["a", "b", "c", "d", "e"], "text": ["A", "B", "C", "D", "E"]})
    return PlatformData("p", inter, items)


def test_last_by_time_is_test_second_last_is_valid():
    data = _platform([("u", "c", 30), ("u", "a", 10), ("u", "d", 40), ("u", "b", 20), ("v", "a", 1)])
    split = leave_one_out(data)
    assert split.user_ids == ["u"]  # v has fewer than 3 interactions
    seq = split.sequences[0]
    assert [split.item_ids[i - 1] for i in seq] == ["a", "b", "c", "d"]
    hist, target = split.eval_inputs("valid")
    assert split.item_ids[target[0] - 1] == "c" and list(hist[0]) == list(seq[:2])
    hist, target = split.eval_inputs("test")
    assert split.item_ids[target[0] - 1] == "d" and list(hist[0]) == list(seq[:3])


def test_ties_keep_file_order():
    data = _platform([("u", "e", 5), ("u", "a", 5), ("u", "b", 5), ("u", "c", 5)])
    split = leave_one_out(data)
    assert [split.item_ids[i - 1] for i in split.sequences[0]] == ["e", "a", "b", "c"]


def test_training_never_sees_valid_or_test_items():
    """Each user's last two items (by time, not file order) are items no training window may contain."""
    rows = []
    for u in range(12):
        history = [("u%d" % u, "abc"[(u + t) % 3], t) for t in range(2 + u)]
        rows += [("u%d" % u, "e", 1000), ("u%d" % u, "d", 999)] + history  # held-out items come first in the file
    split = leave_one_out(_platform(rows))
    d, e = split.item_ids.index("d") + 1, split.item_ids.index("e") + 1
    for max_len in (1, 3, 50):
        inputs, targets = training_pairs(split, max_len)
        assert not np.isin(inputs.numpy(), [d, e]).any() and not np.isin(targets.numpy(), [d, e]).any()
        # every training item but each user's first is predicted exactly once per epoch
        assert int((targets > 0).sum()) == sum(len(s) - 1 for s in split.train_sequences())
    assert all(split.item_ids[t - 1] == "d" for t in split.eval_inputs("valid")[1])
    assert all(split.item_ids[t - 1] == "e" for t in split.eval_inputs("test")[1])
