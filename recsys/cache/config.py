"""Which tables are cached, how large their device caches are, and how they are run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from recsys.cache.slots import CachePolicy
from recsys.specs import EmbeddingConfig


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """`load_factors`: {table: fraction of its rows the device cache holds}, in (0, 1].
    `prefetch_depth`: how many upcoming batches the `lookahead` policy sees; the next
    batch's misses are always fetched while the current step runs."""

    load_factors: Mapping[str, float]
    policy: CachePolicy = CachePolicy.LOOKAHEAD
    prefetch_depth: int = 32

    def __post_init__(self):
        object.__setattr__(self, "policy", CachePolicy(self.policy))
        object.__setattr__(self, "load_factors", dict(self.load_factors))
        for table, factor in self.load_factors.items():
            if not 0 < factor <= 1:
                raise ValueError(f"table {table!r}: cache load factor {factor} must be in (0, 1]")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {self.prefetch_depth}")

    @classmethod
    def for_all(cls, config: EmbeddingConfig, factor: float, **options) -> CacheConfig:
        return cls({t.name: factor for t in config.tables}, **options)


def parse_load_factors(text: str, tables: list[str]) -> dict[str, float]:
    """`--cache-load-factor`: "0.2" for every table, or "t0=0.1,t3=0.5"."""
    text = text.strip()
    if "=" not in text:
        return {t: _factor(text, "every table") for t in tables}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in tables:
            raise ValueError(f"--cache-load-factor names table {name!r}; the tables are {tables}")
        out[name] = _factor(value, f"table {name!r}")
    return out


def _factor(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--cache-load-factor for {what}: {text!r} is not a number") from None
    if not 0 < value <= 1:
        raise ValueError(f"--cache-load-factor for {what}: {value} must be in (0, 1]")
    return value
