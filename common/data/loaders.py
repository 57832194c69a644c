"""Read one platform's data from disk into :class:`PlatformData`, whatever format it ships in.

``load_platform(folder)`` detects the format from the files present (``fmt="auto"``, tried in the order below) or
takes it explicitly. Every loader keeps interaction rows in file order (the split breaks timestamp ties by that
order), keeps every item its item table lists, and ends with :func:`validate`. Bad input raises
:class:`DataError` naming the file, the line (1-based, the header is line 1) or column, and what was expected.
Files are read as strict UTF-8 (a leading byte-order mark is allowed); only ``hetrec`` falls back to Latin-1.

Generic format (for a partner's own data)
-----------------------------------------
A folder holding exactly two files:

``interactions.csv`` or ``interactions.parquet`` -- one row per interaction, oldest first; rows with equal
timestamps keep their file order. Columns are found by header name, in any order; other columns are ignored.

- ``user`` (required): the user id, any non-empty string.
- ``item`` (required): the item id, any string listed in the items file.
- ``timestamp`` (required): integer Unix epoch seconds (``1704067200``), or an ISO-8601 date or date-time
  (``2024-01-01``, ``2024-01-01T09:30:00``, ``2024-01-01 09:30:00+02:00``); a date or date-time without an offset
  is UTC. Stored as int64 epoch seconds. The two kinds may be mixed in one file. Years 1 to 9999.
- ``rating`` (optional): a finite number from 0 to 100; an empty cell means no rating.

``items.csv`` or ``items.parquet`` -- one row per item: ``item`` (a unique id) and ``text`` (a non-empty
description: title, category, brand...). Items nobody interacted with are kept.

CSV files are comma separated, UTF-8, with a header line, quoted the standard way (a field holding commas, quotes
or line breaks is wrapped in double quotes, inner quotes doubled); line numbers in errors count physical lines,
so a quoted line break before the error shifts them. Parquet files hold the same columns; ids may be string or
integer columns, ``timestamp`` may also be a timestamp column; errors there name the row (1-based).

Shipped formats
---------------
- ``unisrec`` (UniSRec/RecBole leave-one-out): ``<name>.{train,valid,test}.inter`` rows (user, history, target)
  with index ids, ``<name>.item2index`` and ``<name>.user2index`` (id TAB index), ``<name>.text`` (ASIN TAB text).
  Each user's full sequence is rebuilt by chaining rows (a row's history, cut to its last 50 items, must equal the
  sequence so far); its position (0, 1, ...) is the timestamp. Items are ASINs, users the original user ids.
- ``rechorus`` (ReChorus): ``train.csv``, ``dev.csv``, ``test.csv`` (TAB separated ``user_id item_id time``; dev
  and test add ``neg_items``, a ``[i, j, ...]`` list), ``<name>.item2index`` (ASIN TAB index), ``<name>.text``
  (``id text``, keyed by ASIN). Interactions are train, dev, test in that order; items are ASINs; the dev/test
  negatives become ``sampled_negatives`` (``user, item, negatives, split`` with split "valid"/"test").
- ``recbole`` (RecBole atomic files): ``<name>.inter`` with ``user_id``, ``item_id``, ``timestamp`` and optional
  ``rating`` columns (headers ``field:type``; other columns ignored) and ``<name>.item``, whose text is its
  ``token``/``token_seq`` columns other than ``item_id`` and URLs, joined by spaces.
- ``grouplens`` (MovieLens CSV): ``ratings.csv`` (userId, movieId, rating, timestamp) and ``movies.csv``
  (movieId, title, genres); text is the title then the genres ("(no genres listed)" dropped).
- ``hetrec`` (Last.fm HetRec 2011): ``user_artists.dat`` (userID, artistID, weight) and ``artists.dat`` (id,
  name); text is the artist name. The data has no time: the timestamp is the row's position within its user
  (the file lists a user's artists by id), and the play count ``weight`` is not a rating (rating is NaN).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from common.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, DataError, PlatformData

UTF8 = "utf-8-sig"  # strict UTF-8 that tolerates the byte-order mark spreadsheet programs write
TSV = {"sep": "\t", "quoting": csv.QUOTE_NONE}
CSV = {"sep": ",", "quoting": csv.QUOTE_MINIMAL}
INDEX_NAMES = ["id", "index"]  # the two columns of a header-less ``.item2index`` / ``.user2index`` file
EPOCH = pd.Timestamp(0, tz="UTC")
# Value ranges: every number a loader reads has one. Integer epoch seconds span the years ISO-8601 dates can
# write (0001-01-01 to 9999-12-31); ratings are a score on a scale up to 100 (MovieLens 0.5-5, Amazon 1-5).
SECONDS_RANGE = (-62135596800, 253402300799)
SECONDS_EXPECTED = ("timestamp {value} out of range; expected integer epoch seconds between -62135596800 and "
                    "253402300799 (years 1 to 9999; milliseconds must be divided by 1000)")
RATING_RANGE = (0.0, 100.0)

# The files each format needs, in detection order; "<name>" is the dataset's file prefix, "a|b" means either.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "generic": ("interactions.csv|interactions.parquet", "items.csv|items.parquet"),
    "unisrec": ("<name>.train.inter", "<name>.valid.inter", "<name>.test.inter", "<name>.item2index",
                "<name>.user2index", "<name>.text"),
    "rechorus": ("<name>.item2index", "<name>.text", "train.csv", "dev.csv", "test.csv"),
    "recbole": ("<name>.inter", "<name>.item"),
    "grouplens": ("ratings.csv", "movies.csv"),
    "hetrec": ("user_artists.dat", "artists.dat"),
}


# ---------------------------------------------------------------------------------------------------- public API

def load_platform(path: str | Path, name: str | None = None, fmt: str = "auto") -> PlatformData:
    """Load one platform folder; ``name`` defaults to the folder's name, ``fmt`` to detection."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(folder, "not a folder; expected a platform folder holding the data files")
    try:
        str(folder.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(folder, "the folder's path is not valid UTF-8; rename it (UTF-8 names only)") from None
    fmt = detect_format(folder) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(folder, f"unknown format {fmt!r}; expected 'auto' or one of {sorted(FORMATS)}")
    return FORMATS[fmt](folder, name or folder.resolve().name)


def detect_format(path: str | Path) -> str:
    """The first format in ``LAYOUTS`` order whose files are all in the folder."""
    folder = Path(path)
    for fmt in LAYOUTS:
        if not _match(folder, fmt)[1]:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(files)}" for fmt, files in LAYOUTS.items())
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise DataError(folder, f"no known data format; expected the files of one of these formats: {expected} "
                            f"(found {found[:20]})")


def validate(data: PlatformData, path: str | Path) -> PlatformData:
    """Schema checks every loader ends with, so later stages can trust columns, dtypes and item references."""
    interactions, items = data.interactions, data.items
    for frame, columns, what in ((interactions, INTERACTION_COLUMNS, "interaction"), (items, ITEM_COLUMNS, "item")):
        if tuple(frame.columns) != columns:
            raise DataError(path, f"{what} columns are {list(frame.columns)}; expected {list(columns)}")
    if interactions.empty:
        raise DataError(path, "no interactions; expected at least one")
    _check_dtypes(interactions, path, {"platform": "str", "user": "str", "item": "str", "timestamp": "int64",
                                       "rating": "float64"})
    _check_dtypes(items, path, {"item": "str", "text": "str"})
    duplicated = items["item"][items["item"].duplicated()]
    if len(duplicated):
        raise DataError(path, f"duplicate item id {duplicated.iloc[0]!r} in the item table; expected unique ids")
    empty = items["item"][items["text"].str.strip() == ""]
    if len(empty):
        raise DataError(path, f"item {empty.iloc[0]!r} has empty text; expected a non-empty description")
    unknown = interactions["item"][~interactions["item"].isin(items["item"])]
    if len(unknown):
        raise DataError(path, f"item {unknown.iloc[0]!r} has interactions but is not in the item table")
    return data


def k_core(data: PlatformData, k: int) -> PlatformData:
    """Repeatedly drop users and items with fewer than ``k`` interactions, keeping file order.

    The item table keeps only the items still interacted with; sampled negatives keep the rows whose user and
    target survive (negatives outside the new item table are dropped later, by the split).
    """
    if k <= 1:
        return data
    interactions = data.interactions
    while True:
        per_user = interactions.groupby("user")["item"].transform("size")
        per_item = interactions.groupby("item")["user"].transform("size")
        keep = (per_user >= k) & (per_item >= k)
        if keep.all():
            break
        interactions = interactions[keep]
    if interactions.empty:
        raise DataError(data.source or data.name, f"the {k}-core is empty; no user and item keep {k} interactions")
    interactions = interactions.reset_index(drop=True)
    items = data.items[data.items["item"].isin(interactions["item"])].reset_index(drop=True)
    negatives = data.sampled_negatives
    if negatives is not None:
        alive = negatives["user"].isin(interactions["user"]) & negatives["item"].isin(items["item"])
        negatives = negatives[alive].reset_index(drop=True)
    return validate(PlatformData(data.name, interactions, items, negatives, data.source), data.source or data.name)


# ------------------------------------------------------------------------------------------------------- formats

def load_generic(folder: Path, name: str) -> PlatformData:
    """The documented partner format (see the module docstring)."""
    inter_file, items_file = _files(folder, "generic")
    raw_items = _read_any(items_file, ("item", "text"))
    items = _item_table(_as_text(raw_items["item"]), _as_text(raw_items["text"]), items_file, "item", "text")
    raw = _read_any(inter_file, ("user", "item", "timestamp"))
    item_ids = _as_text(raw["item"])
    _check_known(item_ids, items["item"], inter_file, "item", items_file)
    users = _as_text(raw["user"])
    _first_bad(inter_file, users.str.strip() == "", users, "empty user id {value}; expected a user id", "user")
    ratings = _ratings(raw["rating"], inter_file) if "rating" in raw else None
    interactions = _interactions(name, users, item_ids, _generic_timestamps(raw["timestamp"], inter_file), ratings)
    return _finish(name, folder, interactions, items)


def load_unisrec(folder: Path, name: str) -> PlatformData:
    """UniSRec leave-one-out rows, stitched back into one chronological sequence per user."""
    train, valid, test, item_file, user_file, text_file = _files(folder, "unisrec")
    catalogue = _Catalogue(_text_items(text_file, "item_id"), _index_map(item_file), item_file, text_file)
    user_ids, rows = _index_map(user_file), {}  # rows: user id -> that user's rows
    for file, split in ((train, "train"), (valid, "valid"), (test, "test")):
        _collect_unisrec_rows(file, split, catalogue, user_ids, user_file, rows)
    cap = max(len(row.history) for user_rows in rows.values() for row in user_rows)
    sequences = {user: _chain(user, user_rows, cap) for user, user_rows in rows.items()}
    lengths = [len(seq) for seq in sequences.values()]
    users = np.repeat(np.array(list(sequences), dtype=object), lengths)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    interactions = _interactions(name, users, list(chain.from_iterable(sequences.values())), positions)
    return _finish(name, folder, interactions, catalogue.items)


def load_rechorus(folder: Path, name: str) -> PlatformData:
    """ReChorus train/dev/test files, concatenated; dev/test negatives kept as ``sampled_negatives``."""
    item_file, text_file, *split_files = _files(folder, "rechorus")
    catalogue = _Catalogue(_text_items(text_file, "id"), _index_map(item_file), item_file, text_file)
    frames, negatives = [], []
    for file, split in zip(split_files, ("train", "valid", "test")):
        raw = _read(file, ("user_id", "item_id", "time") + (("neg_items",) if split != "train" else ()), **TSV)
        item_ids = catalogue.asins(raw["item_id"], file, "item_id")
        frames.append(pd.DataFrame({"user": raw["user_id"].to_numpy(), "item": item_ids.to_numpy(),
                                    "timestamp": _integer_timestamps(raw["time"], file, "time").to_numpy()}))
        if split != "train":
            lists = catalogue.asin_lists(_negative_lists(raw["neg_items"], file), raw.index, file, "neg_items")
            negatives.append(pd.DataFrame({"user": raw["user_id"].to_numpy(), "item": item_ids.to_numpy(),
                                           "negatives": lists, "split": split}))
    log = pd.concat(frames, ignore_index=True)
    interactions = _interactions(name, log["user"], log["item"], log["timestamp"])
    sampled = pd.concat(negatives, ignore_index=True).astype({"user": str, "item": str, "split": str})
    return _finish(name, folder, interactions, catalogue.items, sampled)


def load_recbole(folder: Path, name: str) -> PlatformData:
    """RecBole atomic files; text joins the item file's token columns (ml-100k: title, year, genres)."""
    inter_file, item_file = _files(folder, "recbole")
    raw_items, types = _read_typed(item_file, ("item_id",))
    text_columns = [c for c, t in types.items()
                    if c != "item_id" and t in ("token", "token_seq") and "url" not in c.lower()]
    if not text_columns:
        raise DataError(item_file, f"no text column; expected token or token_seq columns besides item_id "
                                   f"(found {list(types)})")
    text = _join_text(raw_items[c] for c in text_columns)
    items = _item_table(raw_items["item_id"], text, item_file, "item_id", ", ".join(text_columns))
    raw, _ = _read_typed(inter_file, ("user_id", "item_id", "timestamp"))
    _check_known(raw["item_id"], items["item"], inter_file, "item_id", item_file)
    ratings = _ratings(raw["rating"], inter_file) if "rating" in raw else None
    timestamps = _integer_timestamps(raw["timestamp"], inter_file, "timestamp")
    return _finish(name, folder, _interactions(name, raw["user_id"], raw["item_id"], timestamps, ratings), items)


def load_grouplens(folder: Path, name: str) -> PlatformData:
    """MovieLens CSV files; text is the title then the genres."""
    ratings_file, movies_file = _files(folder, "grouplens")
    movies = _read(movies_file, ("movieId", "title", "genres"), **CSV)
    genres = movies["genres"].str.replace("(no genres listed)", "", regex=False).str.replace("|", " ", regex=False)
    text = _join_text((movies["title"], genres))
    items = _item_table(movies["movieId"], text, movies_file, "movieId", "title")
    raw = _read(ratings_file, ("userId", "movieId", "rating", "timestamp"), **CSV)
    _check_known(raw["movieId"], items["item"], ratings_file, "movieId", movies_file)
    timestamps = _integer_timestamps(raw["timestamp"], ratings_file, "timestamp")
    interactions = _interactions(name, raw["userId"], raw["movieId"], timestamps, _ratings(raw["rating"], ratings_file))
    return _finish(name, folder, interactions, items)


def load_hetrec(folder: Path, name: str) -> PlatformData:
    """HetRec 2011 Last.fm play counts: no time, so the timestamp is the row's position within its user."""
    plays_file, artists_file = _files(folder, "hetrec")
    artists = _read(artists_file, ("id", "name"), encoding=_utf8_or_latin1(artists_file), **TSV)
    items = _item_table(artists["id"], artists["name"], artists_file, "id", "name")
    plays = _read(plays_file, ("userID", "artistID"), encoding=_utf8_or_latin1(plays_file), **TSV)
    _check_known(plays["artistID"], items["item"], plays_file, "artistID", artists_file)
    positions = plays.groupby("userID", sort=False).cumcount()
    return _finish(name, folder, _interactions(name, plays["userID"], plays["artistID"], positions), items)


FORMATS: dict[str, Callable[[Path, str], PlatformData]] = {
    "generic": load_generic,
    "unisrec": load_unisrec,
    "rechorus": load_rechorus,
    "recbole": load_recbole,
    "grouplens": load_grouplens,
    "hetrec": load_hetrec,
}


# ------------------------------------------------------------------------------------------------ finding files

def _files(folder: Path, fmt: str) -> list[Path]:
    """The format's files in ``LAYOUTS`` order, or a DataError naming the missing ones."""
    found, missing = _match(folder, fmt)
    if missing:
        raise DataError(folder, f"missing file(s) {missing}; the {fmt} format expects {list(LAYOUTS[fmt])}")
    return found


def _match(folder: Path, fmt: str) -> tuple[list[Path], list[str]]:
    """Which of the format's files are present (as paths) and which are missing (as names)."""
    stem = _stem(folder, LAYOUTS[fmt])
    found, missing = [], []
    for pattern in LAYOUTS[fmt]:
        options = [folder / option.replace("<name>", stem) for option in pattern.split("|")]
        present = [p for p in options if p.is_file()]
        if len(present) > 1:
            raise DataError(folder, f"both {[p.name for p in present]} are present; expected only one of them")
        if present:
            found.append(present[0])
        else:
            missing.append(" or ".join(p.name for p in options))
    return found, missing


def _stem(folder: Path, patterns: Sequence[str]) -> str:
    """The ``<name>`` prefix for which all of a format's named files exist (else the first candidate)."""
    named = [p for p in patterns if p.startswith("<name>")]
    if not named or not folder.is_dir():
        return "<name>"
    suffix = named[0].removeprefix("<name>")
    stems = sorted(f.name.removesuffix(suffix) for f in folder.glob("*" + suffix))
    complete = [s for s in stems if all((folder / p.replace("<name>", s)).is_file() for p in named)]
    if len(complete) > 1:
        raise DataError(folder, f"several data sets here ({complete}); expected one per folder")
    return (complete or stems or ["<name>"])[0]


# ----------------------------------------------------------------------------------------------------- reading

def _read(file: Path, required: Sequence[str] = (), *, names: list[str] | None = None, encoding: str = UTF8,
          **dialect: object) -> pd.DataFrame:
    """Every cell as str; the index is the line number, so every later check can name the line."""
    if not file.is_file():
        raise DataError(file, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # a row with extra fields must not pass silently
            frame = pd.read_csv(file, header=None if names else 0, names=names, dtype=str, na_filter=False,
                                skip_blank_lines=False, index_col=False, encoding=encoding, **dialect)
    except UnicodeDecodeError:
        raise _encoding_error(file) from None
    except pd.errors.EmptyDataError:
        raise DataError(file, "file is empty; expected a header line and data rows") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as err:
        raise DataError(file, f"malformed table ({err}); expected the same number of fields on every line") from None
    frame.index = pd.RangeIndex(1 if names else 2, len(frame) + (1 if names else 2))
    return _checked_shape(_drop_trailing_blank_lines(frame), file, required)


def _read_typed(file: Path, required: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole-style file with its ``field:type`` header split: the frame named by field, and field -> type."""
    frame = _read(file, **TSV)
    types = dict((c.split(":", 1) + [""])[:2] for c in frame.columns)
    frame.columns = list(types)
    return _checked_shape(frame, file, required), types


def _read_any(file: Path, required: Sequence[str]) -> pd.DataFrame:
    """A generic-format table from CSV or parquet; parquet rows are indexed from 1."""
    if file.suffix != ".parquet":
        return _read(file, required, **CSV)
    try:
        frame = pd.read_parquet(file)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(file, f"not a readable parquet file ({type(err).__name__}: {err})") from None
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    return _checked_shape(frame, file, required)


def _checked_shape(frame: pd.DataFrame, file: Path, required: Sequence[str]) -> pd.DataFrame:
    """Required columns present and at least one data row."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(file, f"missing column(s) {missing}; found columns {list(frame.columns)}", column=missing[0])
    if frame.empty:
        raise DataError(file, "no data rows; expected at least one row after the header")
    return frame


def _drop_trailing_blank_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """Blank lines at the end of a file are harmless; those in the middle stay and fail with their line."""
    blank = (frame == "").all(axis=1).to_numpy()
    trailing = np.flip(np.logical_and.accumulate(np.flip(blank)))
    return frame[~trailing]


def _encoding_error(file: Path) -> DataError:
    """Locate the first byte that is not UTF-8 (pandas' own error only knows its read buffer)."""
    raw = file.read_bytes()
    try:
        raw.decode(UTF8)
    except UnicodeDecodeError as err:
        return DataError(file, f"not valid UTF-8: byte {raw[err.start]:#04x} at byte offset {err.start}; "
                               f"expected UTF-8 text", line=raw.count(b"\n", 0, err.start) + 1)
    return DataError(file, "not valid UTF-8; expected UTF-8 text")


def _utf8_or_latin1(file: Path) -> str:
    """HetRec predates UTF-8 everywhere: older copies of its files are Latin-1."""
    try:
        file.read_bytes().decode(UTF8)
    except UnicodeDecodeError:
        return "latin-1"
    return UTF8


def _index_map(file: Path) -> pd.Series:
    """A header-less ``id TAB index`` file as index -> id."""
    frame = _read(file, INDEX_NAMES, names=INDEX_NAMES, **TSV)
    _first_bad(file, frame["index"].duplicated(), frame["index"], "duplicate index {value}; expected each once",
               "index")
    return pd.Series(frame["id"].to_numpy(), index=frame["index"].to_numpy())


def _text_items(file: Path, id_column: str) -> pd.DataFrame:
    """An ``id TAB text`` file (headers may carry RecBole types) as the item table."""
    frame, _ = _read_typed(file, (id_column, "text"))
    return _item_table(frame[id_column], frame["text"], file, id_column, "text")


# ------------------------------------------------------------------------------------------------ cell checks

def _first_bad(file: Path, bad: pd.Series, values: pd.Series, problem: str, column: str | None = None) -> None:
    """Raise for the first row where ``bad`` holds; ``{value}`` in ``problem`` becomes that row's value."""
    hits = np.flatnonzero(bad.to_numpy(dtype=bool))
    if not len(hits):
        return
    label, value = bad.index[hits[0]], values.iloc[hits[0]]
    problem = problem.replace("{value}", repr(value))
    if file.suffix == ".parquet":
        raise DataError(file, f"row {label}: {problem}", column=column)
    raise DataError(file, problem, line=int(label), column=column)


def _item_table(ids: pd.Series, texts: pd.Series, file: Path, id_column: str, text_column: str) -> pd.DataFrame:
    """Items in file order, after checking ids are unique and texts non-empty."""
    texts = texts.str.strip()
    _first_bad(file, ids.duplicated(), ids, "duplicate item id {value}; expected each item once", id_column)
    _first_bad(file, texts == "", ids, "item {value} has empty text; expected a non-empty description", text_column)
    return pd.DataFrame({"item": ids.to_numpy(), "text": texts.to_numpy()}).astype(str)


def _check_known(items: pd.Series, known: pd.Series, file: Path, column: str, table: Path) -> None:
    """Every interacted item must be in the item table, or the model would have no text for it."""
    _first_bad(file, ~items.isin(known), items, f"unknown item {{value}}; expected an item listed in {table.name}",
               column)


def _integer_timestamps(values: pd.Series, file: Path, column: str) -> pd.Series:
    """Whole numbers as int64, within +-2**53; integral float text (RecBole's ``881250949.0``) is accepted."""
    numbers = pd.to_numeric(values, errors="coerce")
    exact = numbers.notna() & (numbers % 1 == 0) & (numbers.abs() <= 2**53)
    _first_bad(file, ~exact, values, "unparsable or out-of-range timestamp {value}; expected an integer time "
               "between -2**53 and 2**53", column)
    return numbers.astype("int64")


def _generic_timestamps(values: pd.Series, file: Path) -> pd.Series:
    """Epoch seconds from integers, ISO-8601 text, or a parquet timestamp column; years 1 to 9999 either way."""
    if pd.api.types.is_datetime64_any_dtype(values):
        seconds = _epoch_seconds(pd.to_datetime(values, utc=True))
        _first_bad(file, seconds.isna(), values, "missing timestamp {value}; expected a time", "timestamp")
        return seconds.astype("int64")
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.astype("float64")
        _first_bad(file, ~numbers.between(*SECONDS_RANGE) | (numbers % 1 != 0), values, SECONDS_EXPECTED,
                   "timestamp")
        return values.astype("int64")
    text = _as_text(values).str.strip()
    integer = text.str.fullmatch(r"[+-]?\d+")
    dates = pd.to_datetime(text.where(~integer), format="ISO8601", utc=True, errors="coerce")
    _first_bad(file, ~integer & dates.isna(), text,
               "unparsable timestamp {value}; expected integer epoch seconds or an ISO-8601 date", "timestamp")
    numbers = pd.to_numeric(text.where(integer), errors="coerce")  # float: exact within the range checked
    _first_bad(file, integer & ~numbers.between(*SECONDS_RANGE), text, SECONDS_EXPECTED, "timestamp")
    return pd.Series(np.where(integer, numbers.fillna(0).astype("int64"),
                              _epoch_seconds(dates).fillna(0).astype("int64")), index=values.index)


def _epoch_seconds(times: pd.Series) -> pd.Series:
    """Whole seconds since 1970 (in microseconds first: nanoseconds cannot hold years before 1677 or after 2262)."""
    return (times.dt.as_unit("us") - EPOCH.as_unit("us")) // pd.Timedelta(seconds=1)


def _ratings(values: pd.Series, file: Path) -> pd.Series:
    """Ratings as float64 within RATING_RANGE; an empty cell means no rating."""
    expected = f"expected a number (finite, between {RATING_RANGE[0]:g} and {RATING_RANGE[1]:g})"
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.astype("float64")
        _first_bad(file, numbers.notna() & ~numbers.between(*RATING_RANGE), values,
                   f"rating {{value}} out of range; {expected}", "rating")
        return numbers
    text = _as_text(values).str.strip()
    numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
    _first_bad(file, (text != "") & numbers.isna(), text, f"non-numeric rating {{value}}; {expected}", "rating")
    _first_bad(file, numbers.notna() & ~numbers.between(*RATING_RANGE), text,
               f"rating {{value}} out of range; {expected}", "rating")
    return numbers.astype("float64")


def _as_text(values: pd.Series) -> pd.Series:
    """Cells as str with missing ones empty (parquet columns may be integers or hold nulls)."""
    return values.astype(object).where(values.notna(), "").astype(str)


def _join_text(parts: Iterable[pd.Series]) -> pd.Series:
    """Join text columns with single spaces, skipping empty cells."""
    parts = iter(parts)
    text = next(parts).str.strip()
    for part in parts:
        text = text.str.cat(part.str.strip(), sep=" ")
    return text.str.replace(r"\s{2,}", " ", regex=True).str.strip()


# ------------------------------------------------------------------------------- index-numbered Amazon data

class _Catalogue:
    """The item table plus the ``.item2index`` map, for files (UniSRec, ReChorus) that number items."""

    def __init__(self, items: pd.DataFrame, index_to_asin: pd.Series, index_file: Path, text_file: Path):
        self.items, self.index_file, self.text_file = items, index_file, text_file
        self._positions = pd.Index(index_to_asin.index)
        self._asins = index_to_asin.to_numpy(dtype=object)
        self._has_text = index_to_asin.isin(items["item"]).to_numpy()

    def asins(self, indexes: pd.Series, file: Path, column: str) -> pd.Series:
        """ASINs of line-indexed item indexes, checking each index is listed and its ASIN has text."""
        pos = self._positions.get_indexer(indexes.to_numpy(dtype=object))
        _first_bad(file, pd.Series(pos < 0, index=indexes.index), indexes,
                   f"unknown item index {{value}}; expected an index listed in {self.index_file.name}", column)
        mapped = pd.Series(self._asins[pos], index=indexes.index)
        _first_bad(file, pd.Series(~self._has_text[pos], index=indexes.index), mapped,
                   f"unknown item {{value}}; expected an item listed in {self.text_file.name}", column)
        return mapped

    def asin_lists(self, lists: Sequence[list[str]], lines: pd.Index, file: Path, column: str) -> list[list[str]]:
        """:meth:`asins` for cells holding lists of indexes, in one vectorised pass."""
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = pd.Series(list(chain.from_iterable(lists)), index=np.repeat(lines, counts), dtype=object)
        mapped = self.asins(flat, file, column).to_numpy()
        return [part.tolist() for part in np.split(mapped, np.cumsum(counts)[:-1])]


def _negative_lists(cells: pd.Series, file: Path) -> list[list[str]]:
    """ReChorus ``[i, j, ...]`` cells as lists of index strings (a stray token fails later as an unknown index)."""
    cells = cells.str.strip()
    _first_bad(file, ~(cells.str.startswith("[") & cells.str.endswith("]")), cells,
               "unparsable negative list {value}; expected [index, index, ...]", "neg_items")
    return [cell[1:-1].replace(",", " ").split() for cell in cells.to_numpy(dtype=object)]


class _Row(NamedTuple):
    """One UniSRec row: the (truncated) history before ``target``, as ASINs."""

    history: tuple[str, ...]
    target: str
    split: str
    file: Path
    line: int


def _collect_unisrec_rows(file: Path, split: str, catalogue: _Catalogue, user_ids: pd.Series, user_file: Path,
                          rows: dict[str, list[_Row]]) -> None:
    """Add one ``.inter`` file's rows to ``rows`` (user id -> rows), checking every index is known."""
    frame, _ = _read_typed(file, ("user_id", "item_id_list", "item_id"))
    _first_bad(file, ~frame["user_id"].isin(user_ids.index), frame["user_id"],
               f"unknown user index {{value}}; expected an index listed in {user_file.name}", "user_id")
    users = user_ids.reindex(frame["user_id"].to_numpy())
    cells = frame["item_id_list"].to_numpy(dtype=object)
    histories = catalogue.asin_lists([cell.split() for cell in cells], frame.index, file, "item_id_list")
    targets = catalogue.asins(frame["item_id"], file, "item_id")
    for user, history, target, line in zip(users.tolist(), histories, targets.tolist(), frame.index):
        rows.setdefault(user, []).append(_Row(tuple(history), target, split, file, line))


def _chain(user: str, rows: list[_Row], cap: int) -> list[str]:
    """One user's full sequence: start from the shortest history, then each next row's history (its last ``cap``
    items) must equal the sequence so far; every row must be used, valid second-to-last and test last."""
    pending: dict[tuple[str, ...], _Row] = {}
    for row in rows:
        if row.history in pending:
            raise DataError(row.file, f"user {user} has two rows with this history; cannot order them",
                            line=row.line)
        pending[row.history] = row
    row: _Row | None = min(rows, key=lambda r: len(r.history))
    sequence, used = list(row.history), []
    while row is not None:
        del pending[row.history]
        sequence.append(row.target)
        used.append(row)
        row = pending.get(tuple(sequence[-cap:]))
    if pending:
        stray = next(iter(pending.values()))
        raise DataError(stray.file, f"the history of user {user} does not continue the sequence rebuilt "
                                    f"from the user's other rows", line=stray.line)
    if [r.split for r in used[-2:]] != ["valid", "test"] or any(r.split != "train" for r in used[:-2]):
        last = used[-1]
        raise DataError(last.file, f"user {user}: expected the train rows first, then one valid and one test "
                                   f"row, got splits {[r.split for r in used]}", line=last.line)
    return sequence


# ------------------------------------------------------------------------------------------------------ output

def _interactions(name: str, users: Iterable, items: Iterable, timestamps: Iterable,
                  ratings: Iterable | None = None) -> pd.DataFrame:
    """The schema's interaction frame; inputs are taken by position (their line-number index is dropped)."""
    frame = pd.DataFrame({"user": np.asarray(users, dtype=object), "item": np.asarray(items, dtype=object),
                          "timestamp": np.asarray(timestamps), "rating": np.nan})
    if ratings is not None:
        frame["rating"] = np.asarray(ratings, dtype=np.float64)
    frame.insert(0, "platform", name)
    return frame.astype({"platform": str, "user": str, "item": str, "timestamp": "int64", "rating": "float64"})


def _finish(name: str, folder: Path, interactions: pd.DataFrame, items: pd.DataFrame,
            negatives: pd.DataFrame | None = None) -> PlatformData:
    return validate(PlatformData(name, interactions, items.reset_index(drop=True), negatives, str(folder)), folder)


def _check_dtypes(frame: pd.DataFrame, path: str | Path, expected: dict[str, str]) -> None:
    for column, dtype in expected.items():
        ok = (pd.api.types.is_string_dtype(frame[column]) if dtype == "str"
              else frame[column].dtype == np.dtype(dtype))
        if not ok:
            raise DataError(path, f"dtype {frame[column].dtype}; expected {dtype}", column=column)
        if frame[column].isna().any() and column != "rating":
            raise DataError(path, "missing values; expected a value in every row", column=column)
