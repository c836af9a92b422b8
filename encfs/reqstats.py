"""Request counts and latency histograms of a mount, for `encfs status`.

`RequestStats.record` runs once per FUSE request on the daemon's one thread, so it is kept
to a dict lookup, an integer bucket index and a list increment: no lock (one thread), no
allocation after an operation's first request, no floats. Percentiles are read from the
histogram only when someone asks (`summary`), with a bucket's precision: four buckets per
power of two, so a percentile is within 19 % of the true value.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Sub-buckets per power of two (as a shift: 2 bits = 4 buckets).
_SUB_BITS = 2
_BUCKETS = (64 << _SUB_BITS) + 1


def _bucket(ns: int) -> int:
    bits = ns.bit_length()
    if bits <= _SUB_BITS + 1:
        return ns  # 0..7 ns: one bucket per value
    return (bits << _SUB_BITS) | ((ns >> (bits - _SUB_BITS - 1)) & ((1 << _SUB_BITS) - 1))


def _bucket_low(index: int) -> int:
    """The smallest latency (ns) that falls into bucket ``index``."""
    if index < (1 << (_SUB_BITS + 1)):
        return index
    bits, sub = index >> _SUB_BITS, index & ((1 << _SUB_BITS) - 1)
    if bits <= _SUB_BITS + 1:  # unused indices between the exact ones and the first 8 ns
        return 1 << (_SUB_BITS + 1)
    return ((1 << _SUB_BITS) | sub) << (bits - _SUB_BITS - 1)


@dataclass(frozen=True)
class OpSummary:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms,
                "p99_ms": self.p99_ms, "max_ms": self.max_ms}


def summarize(hist: list[int]) -> OpSummary:
    """Percentiles of one histogram (the midpoint of the bucket they fall in)."""
    total = sum(hist)
    if total == 0:
        return OpSummary(0, 0.0, 0.0, 0.0, 0.0)
    marks = {q: max(1, -(-total * q // 100)) for q in (50, 90, 99)}  # rank, rounded up
    found: dict[int, float] = {}
    seen = 0
    top = 0.0
    for i, n in enumerate(hist):
        if not n:
            continue
        seen += n
        low, high = _bucket_low(i), _bucket_low(i + 1)
        mid = (low + high) / 2 / 1e6
        top = high / 1e6
        for q, rank in marks.items():
            if q not in found and seen >= rank:
                found[q] = mid
    return OpSummary(total, round(found[50], 3), round(found[90], 3), round(found[99], 3),
                     round(top, 3))


class RequestStats:
    """Counts and latency histograms per FUSE operation since the mount started."""

    def __init__(self) -> None:
        self._hists: dict[str, list[int]] = {}

    def record(self, op: str, ns: int) -> None:
        """One served request of ``op`` that took ``ns`` nanoseconds (hot path)."""
        hist = self._hists.get(op)
        if hist is None:
            hist = self._hists[op] = [0] * _BUCKETS
        hist[_bucket(ns) if ns < (1 << 62) else _BUCKETS - 1] += 1

    def summary(self) -> dict[str, OpSummary]:
        """Per operation, and "all" for every request together."""
        out = {op: summarize(h) for op, h in sorted(self._hists.items())}
        if self._hists:
            out["all"] = summarize([sum(col) for col in zip(*self._hists.values())])
        else:
            out["all"] = summarize([])
        return out
