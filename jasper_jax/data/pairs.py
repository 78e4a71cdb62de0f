"""Pair rows for contrastive training: ``(query, positive[, negatives...])``.

A pair corpus gives, per row, a query, its positive document and a fixed number ``k`` of hard
negative documents. Column order everywhere (teacher dataset, pipeline, losses)::

    column 0          query      (role "query")
    column 1          positive   (role "document")
    columns 2..k+1    negatives  (role "document")
"""

from __future__ import annotations

import dataclasses

QUERY, DOCUMENT = "query", "document"


@dataclasses.dataclass(frozen=True)
class PairRows:
    """Rows of (query, positive, k negatives), every row with the same k.

    Attributes:
      queries: [n] query texts.
      positives: [n] positive document texts.
      negatives: [n] tuples of k hard-negative document texts each (k may be 0).
      source: where the rows came from (for messages and the dataset plan).
    """

    queries: list[str]
    positives: list[str]
    negatives: list[tuple[str, ...]]
    source: str

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def negative_count(self) -> int:
        """k: hard negatives per row."""
        return len(self.negatives[0]) if self.negatives else 0

    @property
    def width(self) -> int:
        """m = 2 + k: texts per row."""
        return 2 + self.negative_count

    def columns(self) -> list[list[str]]:
        """The m columns of texts: queries, positives, then each negative slot."""
        slots = [[row[j] for row in self.negatives] for j in range(self.negative_count)]
        return [list(self.queries), list(self.positives), *slots]

    @staticmethod
    def roles(width: int) -> tuple[str, ...]:
        """The role of each of the `width` columns: query, then documents."""
        return (QUERY, *([DOCUMENT] * (width - 1)))
