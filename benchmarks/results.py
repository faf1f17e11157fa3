"""What a benchmark case produces: Rows (a measured value beside its baseline from the same run, their ratio,
the target it is judged by, and for a miss the profile that explains it) and the Target type itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = ("ratio>=", "ratio<=", "value<=", "excess<=")


@dataclass(frozen=True)
class Target:
    """ratio>= / ratio<=: the row's ratio against `limit`; value<=: the value itself (in `unit`);
    excess<=: value minus baseline value (in `unit`), e.g. peak RSS over the shard."""

    kind: str
    limit: float
    unit: str = ""
    scale: float = 1.0  # value units per displayed unit (1e9 for GB shown beside byte values)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, f"target kind {self.kind!r} is not one of {KINDS}"

    def describe(self) -> str:
        shown = f"{self.limit:g}"
        return {
            "ratio>=": f">= {shown}x",
            "ratio<=": f"<= {shown}x",
            "value<=": f"<= {shown} {self.unit}",
            "excess<=": f"<= baseline + {shown} {self.unit}",
        }[self.kind]

    def measure(self, row: Row) -> float | None:
        """The number the limit applies to (None when the row has no result)."""
        if self.kind.startswith("ratio"):
            return row.ratio
        if row.value is None:
            return None
        if self.kind == "value<=":
            return row.value / self.scale
        return None if row.baseline_value is None else (row.value - row.baseline_value) / self.scale

    def met(self, row: Row) -> bool:
        x = self.measure(row)
        return x is not None and (x >= self.limit if self.kind == "ratio>=" else x <= self.limit)

    def shortfall(self, row: Row) -> str:
        """By how much a missed row misses, in words."""
        x = self.measure(row)
        if x is None:
            return "no measurement"
        if self.kind == "ratio>=":
            return f"{x:.2f}x against >= {self.limit:g}x: {(self.limit - x) / self.limit:.1%} short"
        over = x - self.limit
        if self.kind == "ratio<=":
            return f"{x:.2f}x against <= {self.limit:g}x: {over / self.limit:.1%} over"
        return f"{x:.3g} {self.unit} against <= {self.limit:g} {self.unit}: {over:.3g} {self.unit} over"


@dataclass
class Row:
    """One line of the results table. `ratio` is oriented so that the target reads naturally
    (speed-up: candidate speed / baseline speed; time-to-first-token: ours / baseline)."""

    key: str
    what: str
    baseline: str
    value: float | None
    baseline_value: float | None
    unit: str
    ratio: float | None
    target: Target | None = None
    note: str = ""
    profile: list[str] = field(default_factory=list)  # filled for a miss (or on request): what the time went to
    detail: dict = field(default_factory=dict)  # raw samples and settings, for results.json

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "ERROR"
        if self.target is None:
            return "info"
        return "pass" if self.target.met(self) else "MISS"

    @property
    def missed(self) -> bool:
        return self.verdict in ("MISS", "ERROR")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target"] = None if self.target is None else {**asdict(self.target), "text": self.target.describe()}
        data["verdict"] = self.verdict
        data["shortfall"] = self.target.shortfall(self) if self.target and self.verdict == "MISS" else None
        return data


def failed_row(key: str, what: str, error: BaseException) -> Row:
    """A case that crashed still leaves its row, so the table shows what is missing and why."""
    return Row(key, what, "", None, None, "", None, note=f"failed: {type(error).__name__}: {error}")
