"""Leave-one-out by time: the right items are held out, ties keep file order, nothing leaks into training."""

import numpy as np
import pytest
import pandas as pd

from common.data.schema import PlatformData
from common.data.split import leave_one_out
from common.train import training_pairs


def _platform(rows):
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter.insert(0, "platform", "p")
    inter["rating"] = np.nan
    names = sorted(set(inter["item"]) | {"a", "b", "c", "d", "e"})
    items = pd.DataFrame({"item": names, "text": [n.upper() for n in names]})
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


@pytest.mark.parametrize("max_len, stride", [(5, 1), (5, 2), (5, 5), (4, 3)])
def test_overlapping_windows_learn_each_item_once_after_the_longest_context(max_len, stride):
    """window-stride < max-len: windows overlap, yet each training item is learned exactly once per epoch, after
    as long a context as its history allows up to max-len - stride + 1 items (stride 1: what ranking sees)."""
    rows = [("u", f"i{t:02d}", t) for t in range(15)] + [("v", "i00", 0), ("v", "i01", 1), ("v", "i02", 2)]
    split = leave_one_out(_platform(rows))
    inputs, targets = training_pairs(split, max_len, stride)
    seq = list(split.train_sequences()[0])  # 13 distinct items: an item's index is its position
    contexts = {t: [] for t in range(1, len(seq))}
    for x, y in zip(inputs.tolist(), targets.tolist()):
        for j, item in enumerate(y):
            if item and item in seq:
                assert x[j] == seq[seq.index(item) - 1]  # the input before a target is the item before it
                contexts[seq.index(item)].append(sum(1 for i in x[:j + 1] if i))
    assert all(len(c) == 1 for c in contexts.values())
    assert all(c[0] >= min(t, max_len - stride + 1) for t, c in contexts.items())
    # windows: one from the first item, and one per further stride of targets
    assert len(inputs) == sum(1 + -(-max(0, len(s) - 1 - max_len) // stride) for s in split.train_sequences()
                              if len(s) > 1)
