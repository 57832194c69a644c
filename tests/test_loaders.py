"""Loaders: every shipped format against the real files, the generic format round trip, and broken input."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.loaders import FORMATS, detect_format, k_core, load_platform, validate
from common.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, DataError, PlatformData

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# folder, format, users, interacted items, interactions, item-table size (README table)
REAL = [
    ("ecommerce/amazon-office-2014", "rechorus", 4_905, 2_420, 53_258, 2_420),
    ("ecommerce/amazon-scientific-2018", "unisrec", 8_442, 4_385, 59_427, 4_385),
    ("social/lastfm-sequences", "recbole", 1_142, 11_853, 68_436, 11_853),
    ("social/lastfm-tag-timeline", "recbole", 1_362, 2_975, 64_286, 2_975),
    ("social/lastfm-hetrec2011", "hetrec", 1_892, 17_632, 92_834, 17_632),
    ("video/movielens-100k", "recbole", 943, 1_682, 100_000, 1_682),
    ("video/movielens-latest-small", "grouplens", 610, 9_724, 100_836, 9_742),  # 18 movies nobody rated
]


@lru_cache(maxsize=None)
def real(folder: str) -> PlatformData:
    """Each real dataset is loaded once for the whole module."""
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real data not present at {path}")
    return load_platform(path)


def raw_tsv(folder: str, file: str) -> pd.DataFrame:
    return pd.read_csv(DATA / folder / file, sep="\t", dtype=str, quoting=3, keep_default_na=False)


# ------------------------------------------------------------------------------------------------- real data

@pytest.mark.parametrize("folder, fmt, users, items, rows, catalogue", REAL, ids=[r[0] for r in REAL])
def test_real_counts_and_schema(folder, fmt, users, items, rows, catalogue):
    data = real(folder)
    inter = data.interactions
    assert detect_format(DATA / folder) == fmt
    assert (data.num_users, inter["item"].nunique(), len(inter), data.num_items) == (users, items, rows, catalogue)
    assert tuple(inter.columns) == INTERACTION_COLUMNS and tuple(data.items.columns) == ITEM_COLUMNS
    assert inter["timestamp"].dtype == np.int64 and inter["rating"].dtype == np.float64
    assert all(pd.api.types.is_string_dtype(inter[c]) for c in ("platform", "user", "item"))
    assert (inter["platform"] == Path(folder).name).all() and data.source == str(DATA / folder)
    assert inter["item"].isin(data.items["item"]).all() and data.items["item"].is_unique


@pytest.mark.parametrize("folder, item, text", [
    ("video/movielens-100k", "1", "Toy Story 1995 Animation Children's Comedy"),
    ("video/movielens-latest-small", "1", "Toy Story (1995) Adventure Animation Children Comedy Fantasy"),
    ("social/lastfm-sequences", "1", "Morcheeba"),
    ("social/lastfm-tag-timeline", "2", "Diary of Dreams"),  # name only: the URL columns are not text
    ("social/lastfm-hetrec2011", "1", "MALICE MIZER"),
    ("ecommerce/amazon-office-2014", "B00000JBLU",
     "Texas Instruments TI-1795 SV Standard Function Calculator Basic Texas Instruments"),
    ("ecommerce/amazon-scientific-2018", "B0000223UV", "Gorilla Original Gorilla Glue, Waterproof"),
])
def test_real_item_text(folder, item, text):
    texts = real(folder).items.set_index("item")["text"]
    assert texts[item].startswith(text)


@pytest.mark.parametrize("folder, file, user, item", [
    ("video/movielens-100k", "ml-100k.inter", "user_id:token", "item_id:token"),
    ("social/lastfm-tag-timeline", "lastfm.inter", "user_id:token", "item_id:token"),
    ("social/lastfm-hetrec2011", "user_artists.dat", "userID", "artistID"),
])
def test_real_file_order_kept(folder, file, user, item):
    inter = real(folder).interactions  # skips when the data is absent
    raw = raw_tsv(folder, file)
    assert inter["user"].tolist() == raw[user].tolist() and inter["item"].tolist() == raw[item].tolist()


def test_recbole_timestamps_exact_and_duplicates_kept():
    seq = real("social/lastfm-sequences").interactions
    assert seq["timestamp"].iloc[:3].tolist() == [1238536800001, 1238536800002, 1238536800003]
    assert real("video/movielens-100k").interactions["timestamp"].iloc[0] == 881250949
    tags = real("social/lastfm-tag-timeline").interactions
    assert tags.duplicated(["user", "item"]).sum() == 48_612  # repeated tag events of one artist stay


def test_hetrec_timestamp_is_position_within_user():
    inter = real("social/lastfm-hetrec2011").interactions
    assert (inter["timestamp"] == inter.groupby("user").cumcount()).all()
    assert inter["rating"].isna().all()


def test_office_order_and_sampled_negatives():
    folder = "ecommerce/amazon-office-2014"
    data = real(folder)
    index = pd.read_csv(DATA / folder / "Office.item2index", sep="\t", header=None, dtype=str)
    item2asin = dict(zip(index[1], index[0]))
    raw = pd.concat([raw_tsv(folder, f"{s}.csv") for s in ("train", "dev", "test")], ignore_index=True)
    assert data.interactions["user"].tolist() == raw["user_id"].tolist()
    assert data.interactions["item"].tolist() == raw["item_id"].map(item2asin).tolist()
    assert data.interactions["timestamp"].tolist() == raw["time"].astype(int).tolist()

    neg = data.sampled_negatives
    assert list(neg.columns) == ["user", "item", "negatives", "split"] and len(neg) == 2 * 4_905
    assert neg["negatives"].map(len).eq(99).all()
    assert set(neg["negatives"].explode()) <= set(data.items["item"])
    last = data.interactions.groupby("user", sort=False)["item"].agg(lambda s: s.iloc[-1])
    second = data.interactions.groupby("user", sort=False)["item"].agg(lambda s: s.iloc[-2])
    test, valid = neg[neg["split"] == "test"], neg[neg["split"] == "valid"]
    assert (test["item"].to_numpy() == last.reindex(test["user"]).to_numpy()).all()
    assert (valid["item"].to_numpy() == second.reindex(valid["user"]).to_numpy()).all()


def test_unisrec_sequences_match_every_row():
    folder = "ecommerce/amazon-scientific-2018"
    inter = real(folder).interactions
    assert (inter["timestamp"] == inter.groupby("user").cumcount()).all()
    sequences = inter.groupby("user", sort=False)["item"].agg(list).to_dict()
    items = pd.read_csv(DATA / folder / "Scientific.item2index", sep="\t", header=None, dtype=str)
    users = pd.read_csv(DATA / folder / "Scientific.user2index", sep="\t", header=None, dtype=str)
    asin, user_id = dict(zip(items[1], items[0])), dict(zip(users[1], users[0]))
    checked = 0
    for split in ("train", "valid", "test"):
        for u, history, target in raw_tsv(folder, f"Scientific.{split}.inter").itertuples(index=False):
            seq = sequences[user_id[u]]
            h = [asin[i] for i in history.split()]
            k = {"test": len(seq) - 1, "valid": len(seq) - 2}.get(split)
            if k is None:  # a train row's target position: its history is the sequence before it, cut to 50
                k = next(p for p in range(1, len(seq) - 2) if seq[max(0, p - 50):p] == h and seq[p] == asin[target])
            assert seq[max(0, k - 50):k] == h and seq[k] == asin[target]
            checked += 1
    assert checked == 34_101 + 2 * 8_442 == len(inter) - inter["user"].nunique()


# ------------------------------------------------------------------------------------------- small fixtures

def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


UNISREC_HEAD = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
RECHORUS_HEAD = "user_id\titem_id\ttime\tneg_items\n"
RECBOLE_HEAD = "user_id:token\titem_id:token\ttimestamp:float\n"
GENERIC = {
    "interactions.csv": "user,item,timestamp,rating,device\n"
                        "u1,a,100,4,phone\n"
                        "u1,b,2024-01-01,,tv\n"
                        "u2,a,2024-01-01T02:00:00+02:00,3.5,tv\n"
                        "u2,c,2024-01-01 00:00:30,1,phone\n",
    "items.csv": 'item,text\na,"Apple, red"\nb,"Banana ""B"""\nc,Cherry\nd,Never bought\n',
}
UNISREC = {  # a 6-item user whose histories are cut to their last 2 items
    "S.item2index": "A0\t0\nA1\t1\nA2\t2\nA3\t3\nA4\t4\nA5\t5\n",
    "S.user2index": "Ux\t0\n",
    "S.text": "item_id:token\ttext:token_seq\n" + "".join(f"A{i}\titem {i}\n" for i in range(6)),
    "S.train.inter": f"{UNISREC_HEAD}0\t1 2\t3\n0\t0 1\t2\n0\t0\t1\n",
    "S.valid.inter": f"{UNISREC_HEAD}0\t2 3\t4\n",
    "S.test.inter": f"{UNISREC_HEAD}0\t3 4\t5\n",
}
RECHORUS = {
    "Shop.item2index": "A\t1\nB\t2\nC\t3\n",
    "Shop.text": "id\ttext\nA\tapple\nB\tbanana\nC\tcherry\n",
    "train.csv": "user_id\titem_id\ttime\n7\t1\t10\n",
    "dev.csv": f"{RECHORUS_HEAD}7\t2\t20\t[3, 1]\n",
    "test.csv": f"{RECHORUS_HEAD}7\t3\t30\t[1,2]\n",
}
RECBOLE = {
    "ml.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t881250949.0\n2\t20\t4\t5\n",
    "ml.item": "item_id:token\tmovie_title:token_seq\turl:token\tprice:float\n10\tHeat\thttp://h\t9.5\n"
               "20\tRonin\thttp://r\t1\n",
}


def test_generic_csv_round_trip(tmp_path):
    data = load_platform(write(tmp_path / "shop", GENERIC))
    inter = data.interactions
    assert data.name == "shop" and inter["platform"].eq("shop").all()
    assert inter["user"].tolist() == ["u1", "u1", "u2", "u2"] and inter["item"].tolist() == ["a", "b", "a", "c"]
    assert inter["timestamp"].tolist() == [100, 1_704_067_200, 1_704_067_200, 1_704_067_230]
    assert inter["rating"].tolist()[:1] + inter["rating"].tolist()[2:] == [4.0, 3.5, 1.0]
    assert np.isnan(inter["rating"].iloc[1])
    assert data.items["text"].tolist() == ["Apple, red", 'Banana "B"', "Cherry", "Never bought"]


def test_generic_parquet_round_trip(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    pd.DataFrame({"user": [5, 6], "item": [1, 2], "timestamp": pd.to_datetime(["2024-01-01", "2024-01-02"])}) \
        .to_parquet(folder / "interactions.parquet")
    pd.DataFrame({"item": [1, 2], "text": ["one", "two"]}).to_parquet(folder / "items.parquet")
    data = load_platform(folder, name="partner")
    assert data.name == "partner" and data.interactions["user"].tolist() == ["5", "6"]
    assert data.interactions["item"].tolist() == ["1", "2"] and data.items["item"].tolist() == ["1", "2"]
    assert data.interactions["timestamp"].tolist() == [1_704_067_200, 1_704_153_600]
    assert data.interactions["rating"].isna().all()


def test_unisrec_stitches_truncated_histories(tmp_path):
    data = load_platform(write(tmp_path / "sci", UNISREC))
    assert data.interactions["item"].tolist() == [f"A{i}" for i in range(6)]
    assert data.interactions["timestamp"].tolist() == list(range(6)) and data.interactions["user"].eq("Ux").all()


def test_rechorus_small(tmp_path):
    data = load_platform(write(tmp_path / "shop", RECHORUS))
    assert data.interactions["item"].tolist() == ["A", "B", "C"]
    assert data.sampled_negatives.to_dict("list") == {"user": ["7", "7"], "item": ["B", "C"],
                                                      "negatives": [["C", "A"], ["A", "B"]],
                                                      "split": ["valid", "test"]}


def test_recbole_text_skips_urls_and_numbers(tmp_path):
    data = load_platform(write(tmp_path / "ml", RECBOLE))
    assert data.items["text"].tolist() == ["Heat", "Ronin"]
    assert data.interactions["timestamp"].tolist() == [881250949, 5]


def test_hetrec_falls_back_to_latin1(tmp_path):
    folder = write(tmp_path / "fm", {"artists.dat": b"id\tname\turl\tpictureURL\r\n1\tBj\xf6rk\thttp://b\t\r\n",
                                     "user_artists.dat": "userID\tartistID\tweight\r\n2\t1\t10\r\n"})
    data = load_platform(folder)
    assert data.items["text"].tolist() == ["Björk"] and data.interactions["user"].tolist() == ["2"]


def test_explicit_format_and_unknown_format(tmp_path):
    folder = write(tmp_path / "ml", RECBOLE)
    assert load_platform(folder, fmt="recbole").num_items == 2
    assert set(FORMATS) == {"generic", "unisrec", "rechorus", "recbole", "grouplens", "hetrec"}
    with pytest.raises(DataError, match="unknown format 'nope'"):
        load_platform(folder, fmt="nope")


# ---------------------------------------------------------------------------------------------- broken input

def replace(base: dict[str, str], name: str, content: str | bytes | None) -> dict[str, str | bytes]:
    """``base`` with one file replaced, or removed (None)."""
    files = {k: v for k, v in base.items() if k != name}
    return files if content is None else {**files, name: content}


BROKEN = [
    ("missing column", replace(GENERIC, "interactions.csv", "user,item,time\nu1,a,1\n"), "auto",
     ["interactions.csv", "missing column(s) ['timestamp']", "found columns ['user', 'item', 'time']"]),
    ("unparsable timestamp", replace(GENERIC, "interactions.csv", "user,item,timestamp\nu1,a,1\nu1,b,yesterday\n"),
     "auto", ["interactions.csv, line 3, column 'timestamp'", "'yesterday'", "ISO-8601"]),
    ("non-numeric rating", replace(GENERIC, "interactions.csv", "user,item,timestamp,rating\nu1,a,1,good\n"), "auto",
     ["interactions.csv, line 2, column 'rating'", "'good'", "expected a number"]),
    ("unknown item", replace(GENERIC, "interactions.csv", "user,item,timestamp\nu1,a,1\nu1,b,2\nu2,zzz,3\n"), "auto",
     ["interactions.csv, line 4, column 'item'", "unknown item 'zzz'", "listed in items.csv"]),
    ("empty text", replace(GENERIC, "items.csv", "item,text\na,Apple\nb,   \nc,C\n"), "auto",
     ["items.csv, line 3, column 'text'", "item 'b' has empty text"]),
    ("duplicate item id", replace(GENERIC, "items.csv", "item,text\na,Apple\nb,B\na,Again\nc,C\n"), "auto",
     ["items.csv, line 4, column 'item'", "duplicate item id 'a'"]),
    ("not UTF-8", replace(GENERIC, "items.csv", b"item,text\na,Apple\nb,caf\xe9\nc,C\n"), "auto",
     ["items.csv, line 3", "not valid UTF-8", "0xe9", "byte offset 23"]),
    ("missing file", replace(GENERIC, "items.csv", None), "generic",
     ["missing file(s) ['items.csv or items.parquet']"]),
    ("missing recbole item file", {"ml.inter": RECBOLE["ml.inter"]}, "recbole", ["missing file(s) ['ml.item']"]),
    ("header only", replace(GENERIC, "interactions.csv", "user,item,timestamp\n"), "auto",
     ["interactions.csv", "no data rows"]),
    ("zero bytes", replace(GENERIC, "interactions.csv", ""), "auto", ["interactions.csv", "file is empty"]),
    ("blank line inside", replace(GENERIC, "interactions.csv", "user,item,timestamp\nu1,a,1\n\nu1,b,2\n"), "auto",
     ["interactions.csv, line 3", "unknown item ''"]),
    ("extra field", replace(GENERIC, "interactions.csv", "user,item,timestamp\nu1,a,1\nu1,b,2,9\n"), "auto",
     ["interactions.csv", "malformed", "line 3"]),
    ("undetectable folder", {"notes.txt": "hello"}, "auto",
     ["no known data format", "recbole: <name>.inter, <name>.item", "found ['notes.txt']"]),
    ("csv and parquet", replace(GENERIC, "items.parquet", b"PAR1"), "auto",
     ["both ['items.csv', 'items.parquet']", "only one"]),
    ("recbole fractional time", replace(RECBOLE, "ml.inter", f"{RECBOLE_HEAD}1\t10\t5\n1\t20\t881250949.5\n"), "auto",
     ["ml.inter, line 3, column 'timestamp'", "'881250949.5'", "integer"]),
    ("recbole unknown item", replace(RECBOLE, "ml.inter", f"{RECBOLE_HEAD}1\t99\t5\n"), "auto",
     ["ml.inter, line 2, column 'item_id'", "unknown item '99'", "ml.item"]),
    ("rechorus bad list", replace(RECHORUS, "dev.csv", f"{RECHORUS_HEAD}7\t2\t20\t3, 1\n"), "auto",
     ["dev.csv, line 2, column 'neg_items'", "expected [index, index, ...]"]),
    ("rechorus unknown negative", replace(RECHORUS, "test.csv", f"{RECHORUS_HEAD}7\t3\t30\t[1, x]\n"), "auto",
     ["test.csv, line 2, column 'neg_items'", "unknown item index 'x'", "Shop.item2index"]),
    ("rechorus item without text", replace(RECHORUS, "Shop.text", "id\ttext\nA\tapple\nC\tcherry\n"), "auto",
     ["dev.csv, line 2, column 'item_id'", "unknown item 'B'", "Shop.text"]),
    ("unisrec broken chain", replace(UNISREC, "S.test.inter", f"{UNISREC_HEAD}0\t4 3\t5\n"), "auto",
     ["S.test.inter, line 2", "does not continue the sequence"]),
    ("unisrec unknown user", replace(UNISREC, "S.valid.inter", f"{UNISREC_HEAD}9\t2 3\t4\n"), "auto",
     ["S.valid.inter, line 2, column 'user_id'", "unknown user index '9'", "S.user2index"]),
]


@pytest.mark.parametrize("files, fmt, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_input_names_file_line_and_expectation(tmp_path, files, fmt, expected):
    folder = write(tmp_path / "broken", files)
    with pytest.raises(DataError) as caught:
        load_platform(folder, fmt=fmt)
    for part in expected:
        assert part in str(caught.value)


def test_parquet_errors_name_the_row(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    interactions = pd.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "timestamp": [1, 2]})
    interactions.to_parquet(folder / "interactions.parquet")
    pd.DataFrame({"item": ["a"], "text": ["A"]}).to_parquet(folder / "items.parquet")
    with pytest.raises(DataError, match=r"interactions.parquet, column 'item': row 2: unknown item 'b'"):
        load_platform(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_platform(tmp_path / "absent")


# ----------------------------------------------------------------------------------------- validate, k_core

def frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter.insert(0, "platform", "p")
    inter["rating"] = np.nan
    return inter.astype({"platform": str, "user": str, "item": str, "timestamp": "int64"})


def items(ids: str) -> pd.DataFrame:
    return pd.DataFrame({"item": list(ids), "text": [f"text {i}" for i in ids]}).astype(str)


def test_validate_rejects_unknown_item_and_bad_dtype():
    data = PlatformData("p", frame([("u", "a", 1), ("u", "z", 2)]), items("ab"))
    with pytest.raises(DataError, match="item 'z' has interactions but is not in the item table"):
        validate(data, "mem")
    data = PlatformData("p", frame([("u", "a", 1)]).astype({"timestamp": "float64"}), items("a"))
    with pytest.raises(DataError, match="column 'timestamp'.*expected int64"):
        validate(data, "mem")


def test_k_core_drops_iteratively_and_keeps_order():
    rows = [("u1", "a", 3), ("u2", "a", 1), ("u1", "b", 2), ("u2", "b", 4), ("u3", "a", 5), ("u3", "c", 6)]
    negatives = pd.DataFrame({"user": ["u1", "u3"], "item": ["b", "c"], "negatives": [["a"], ["a"]],
                              "split": ["test", "test"]})
    data = PlatformData("p", frame(rows), items("abc"), negatives, "mem")
    assert k_core(data, 1) is data
    core = k_core(data, 2)  # c has one interaction; then u3 has one; then a still has two
    assert core.interactions[["user", "item"]].values.tolist() == [["u1", "a"], ["u2", "a"], ["u1", "b"], ["u2", "b"]]
    assert core.items["item"].tolist() == ["a", "b"] and core.sampled_negatives["user"].tolist() == ["u1"]
    with pytest.raises(DataError, match="3-core is empty"):
        k_core(data, 3)
