"""The one schema every loader produces: a platform's interactions plus its item texts.

Loaders keep rows in file order; the split breaks timestamp ties by that order, so the order is part of the
data.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from common.errors import UserError, printable_path

INTERACTION_COLUMNS = ("platform", "user", "item", "timestamp", "rating")
ITEM_COLUMNS = ("item", "text")


class DataError(UserError):
    """Bad input data: the message names the file, the line or column, and what was expected."""

    def __init__(self, path: object, problem: str, *, line: int | None = None, column: str | None = None):
        where = printable_path(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.column, self.problem = path, line, column, problem


@dataclass
class PlatformData:
    """One platform's private data.

    interactions: columns ``platform, user, item`` (str), ``timestamp`` (int64, any monotone unit),
        ``rating`` (float64, NaN where the source has none); rows in file order.
    items: columns ``item`` (str, unique), ``text`` (str, non-empty); every interacted item appears here.
    sampled_negatives: optional, for datasets that ship a sampled evaluation (ReChorus): columns
        ``user, item, negatives`` (the held-out target and the list of item ids it is ranked against).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    sampled_negatives: pd.DataFrame | None = None
    source: str = ""

    @property
    def num_users(self) -> int:
        return int(self.interactions["user"].nunique())

    @property
    def num_items(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        return (f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
                f"{len(self.interactions):,} interactions ({self.source or 'in memory'})")
