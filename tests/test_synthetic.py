"""The generated default dataset: deterministic, schema-exact, and realistic in the ways Pollen relies on."""

from __future__ import annotations

import re
import time
from collections import Counter
from functools import cache

import numpy as np
import pandas as pd
import pytest

from common.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, PlatformData
from common.data.synthetic import GENERIC, PLATFORMS, TOPICS, SyntheticConfig, generate, item_topics


@cache
def _data(**kw: object) -> tuple[list[PlatformData], dict[str, str]]:
    """Generated once per config: the platforms and the hidden topic of each item."""
    config = SyntheticConfig(**kw)
    return generate(config), item_topics(config)


def _default() -> dict[str, PlatformData]:
    return {d.name: d for d in _data()[0]}


def _histories(d: PlatformData) -> dict[str, list[str]]:
    return {u: list(g["item"]) for u, g in d.interactions.groupby("user", sort=False)}


def _dominant(items: list[str], topics: dict[str, str]) -> str | None:
    counts = Counter(topics[i] for i in items if topics[i] != GENERIC)
    return counts.most_common(1)[0][0] if counts else None


# ---- determinism and schema ----------------------------------------------------------------------------------

def test_same_seed_same_data_and_other_seed_differs() -> None:
    a, b, c = generate(SyntheticConfig(seed=7)), generate(SyntheticConfig(seed=7)), generate(SyntheticConfig(seed=8))
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x.interactions, y.interactions)
        pd.testing.assert_frame_equal(x.items, y.items)
    assert all(not x.items.equals(z.items) and not x.interactions.equals(z.interactions) for x, z in zip(a, c))


def test_schema_ids_and_histories() -> None:
    platforms = _data()[0]
    assert [d.name for d in platforms] == list(PLATFORMS)
    for d in platforms:
        df, items = d.interactions, d.items
        assert d.source == "synthetic(seed=0)" and d.sampled_negatives is None
        assert tuple(df.columns) == INTERACTION_COLUMNS and tuple(items.columns) == ITEM_COLUMNS
        for col in ("platform", "user", "item"):
            assert pd.api.types.is_string_dtype(df[col]) and df[col].map(type).eq(str).all()
        assert df["timestamp"].dtype == np.int64 and df["rating"].dtype == np.float64
        assert (df["platform"] == d.name).all()
        assert items["item"].is_unique and items["text"].is_unique
        assert items["item"].str.fullmatch(d.name[0] + r"\d{4}").all()
        assert df["user"].str.fullmatch(r"u\d{4}").all()
        words = items["text"].str.split().str.len()
        assert words.between(6, 25).all() and (items["text"].str.strip() == items["text"]).all()
        assert set(df["item"]) <= set(items["item"])
        assert not df.duplicated(["user", "item"]).any()  # histories never repeat an item by default
        by_user = df.groupby("user", sort=False)
        assert by_user.size().min() >= 5
        assert by_user["timestamp"].apply(lambda t: bool((np.diff(t.to_numpy()) > 0).all())).all()
        # rows come grouped by user, each user's rows in time order
        assert (df["user"] != df["user"].shift()).sum() == df["user"].nunique()
        years = pd.to_datetime(df["timestamp"], unit="s").dt.year
        assert years.between(2023, 2025).all() and (years <= 2024).mean() > 0.95
        if d.name == "video":
            assert df["rating"].isin([1.0, 2.0, 3.0, 4.0, 5.0]).all()
        else:
            assert df["rating"].isna().all()


def test_sizes_match_config_and_item_topics_cover_items() -> None:
    platforms, topics = _data()
    config = SyntheticConfig()
    for d in platforms:
        assert d.num_users == config.users[d.name] and d.num_items == config.items[d.name]
        lengths = d.interactions.groupby("user").size()
        assert 0.8 * config.mean_history <= lengths.mean() <= 1.2 * config.mean_history
        assert lengths.max() > 2.5 * config.mean_history  # long-tailed
        assert set(d.items["item"]) <= set(topics)
        assert Counter(topics[i] for i in d.items["item"])[GENERIC] >= 1
    assert set(topics.values()) == set(TOPICS) | {GENERIC}

    small = SyntheticConfig(seed=3, users={"ecommerce": 40, "video": 25}, items={"ecommerce": 60, "video": 50},
                            topics=6, mean_history=9.0)
    out = generate(small)
    assert [d.name for d in out] == ["ecommerce", "video"]
    assert [(d.num_users, d.num_items) for d in out] == [(40, 60), (25, 50)]
    assert set(item_topics(small).values()) == set(TOPICS[:6]) | {GENERIC}


@pytest.mark.parametrize("kw", [
    dict(users={"ecommerce": 10}, items={"video": 100}),
    dict(users={"video": 10, "ecommerce": 10}, items={"video": 100, "ecommerce": 100}),
    dict(items={"ecommerce": 20, "social": 200, "video": 160}),
    dict(topics=40), dict(mean_history=3.0), dict(popular_rate=0.6, exploration_rate=0.6), dict(drift=-0.1),
])
def test_bad_config_is_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**kw)


def test_generation_is_fast() -> None:
    t = time.perf_counter()
    generate(SyntheticConfig(seed=11))
    assert time.perf_counter() - t < 2.0


# ---- realism ---------------------------------------------------------------------------------------------------

def test_popularity_is_skewed_but_not_degenerate() -> None:
    for d in _default().values():
        counts = d.interactions["item"].value_counts()
        top = counts.iloc[: d.num_items // 10].sum() / len(d.interactions)
        assert 0.30 < top < 0.70, (d.name, top)
        assert counts.size >= 0.9 * d.num_items  # the long tail is still consumed


def test_each_platform_has_its_own_text_style() -> None:
    data = _default()

    def share(name: str, pattern: str) -> float:
        return float(data[name].items["text"].str.contains(pattern, regex=True).mean())

    assert share("social", "#") > 0.6 and share("ecommerce", "#") == 0 and share("video", "#") < 0.2
    assert share("ecommerce", "–|, ") > 0.9 and share("ecommerce", r"\?|!") == 0  # listings, not sentences
    assert share("video", r"\||How to|Top \d+|Review|Explained|Beginners|I Tried|Mistakes|Truth") > 0.9
    assert share("social", r"\bmy\b|\bI\b|POV|Anyone|community|Just got|today|this") > 0.5


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z-]+", text.lower()) if len(w) > 2}


def test_topic_words_bridge_platforms_but_phrasing_differs() -> None:
    """A bag of words learnt on one platform's texts places another platform's items in the right topic."""
    data, topics = _default(), _data()[1]
    vocab: dict[str, dict[str, Counter]] = {}
    for name, d in data.items():
        vocab[name] = {}
        for item, text in zip(d.items["item"], d.items["text"]):
            vocab[name].setdefault(topics[item], Counter()).update(_words(text))
    for src in PLATFORMS:
        for dst in PLATFORMS:
            if src == dst:
                continue
            spread = Counter(w for c in vocab[src].values() for w in c)  # words of many topics carry no signal
            hits = total = 0
            for item, text in zip(data[dst].items["item"], data[dst].items["text"]):
                if topics[item] == GENERIC:
                    continue
                scores = {t: sum(c[w] / spread[w] for w in _words(text) if w in c) for t, c in vocab[src].items()}
                hits += max(scores, key=scores.get) == topics[item]
                total += 1
            assert hits / total > 0.5, (src, dst, hits / total)
    # ... while the phrasing differs: each platform's most frequent words are mostly its own
    frequent = {n: {w for w, _ in Counter(w for t in d.items["text"] for w in _words(t)).most_common(25)}
                for n, d in data.items()}
    for a, b in [("ecommerce", "social"), ("ecommerce", "video"), ("social", "video")]:
        assert len(frequent[a] & frequent[b]) <= 6, (a, b, frequent[a] & frequent[b])


def test_people_share_interests_across_platforms() -> None:
    data, topics = _default(), _data()[1]
    users = [set(d.interactions["user"]) for d in data.values()]
    everyone = set().union(*users)
    multi = sum(sum(u in s for s in users) >= 2 for u in everyone) / len(everyone)
    assert multi > 0.6  # most people use two or three platforms
    rng = np.random.default_rng(0)
    for a, b in [("ecommerce", "social"), ("ecommerce", "video"), ("social", "video")]:
        ha, hb = _histories(data[a]), _histories(data[b])
        common = sorted(set(ha) & set(hb))
        da = np.array([_dominant(ha[u], topics) for u in common], dtype=object)
        db = np.array([_dominant(hb[u], topics) for u in common], dtype=object)
        match = float((da == db).mean())
        chance = float(np.mean([(da == rng.permutation(db)).mean() for _ in range(20)]))
        assert len(common) > 100 and match > 0.45 and match > 2.5 * chance, (a, b, match, chance)


def _first_vs_last_third(platforms: list[PlatformData], topics: dict[str, str]) -> float:
    """How often the dominant topic of a history's first third differs from that of its last third."""
    out = []
    for d in platforms:
        for seq in _histories(d).values():
            if len(seq) >= 12:
                third = len(seq) // 3
                out.append(_dominant(seq[:third], topics) != _dominant(seq[-third:], topics))
    return float(np.mean(out))


def test_interests_drift_over_time() -> None:
    """Paired with a no-drift control (same seed, same random draws): only the drift differs."""
    for seed in (0, 1):
        drifting = _first_vs_last_third(*_data(seed=seed))
        control = _first_vs_last_third(*_data(seed=seed, drift=0.0))
        assert drifting > control + 0.03, (seed, drifting, control)


def _same_topic_next(platforms: list[PlatformData], topics: dict[str, str]) -> float:
    pairs = [(topics[a], topics[b]) for d in platforms for s in _histories(d).values() for a, b in zip(s, s[1:])]
    return float(np.mean([a == b for a, b in pairs]))


def test_consecutive_items_are_related() -> None:
    """Beyond the user's mixture, the next item often continues the previous one: sequence models gain."""
    with_seq = _same_topic_next(*_data())
    control = _same_topic_next(*_data(sequential_rate=0.0))
    assert with_seq > control + 0.08, (with_seq, control)
    # the "next episode" relation is item-level: some item pairs recur in many users' histories
    pairs = Counter((a, b) for s in _histories(_default()["video"]).values() for a, b in zip(s, s[1:]))
    assert sum(c for c in pairs.values() if c >= 3) / sum(pairs.values()) > 0.1


def test_video_ratings_follow_interest() -> None:
    video, topics = _default()["video"], _data()[1]
    df = video.interactions
    dominant = {u: _dominant(s, topics) for u, s in _histories(video).items()}
    liked = df["item"].map(topics) == df["user"].map(dominant)
    assert df.loc[liked, "rating"].mean() > df.loc[~liked, "rating"].mean() + 0.6
    assert df["rating"].value_counts().min() > 0.03 * len(df)  # all five star levels in use
