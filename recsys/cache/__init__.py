"""Tables larger than the device: a software-managed cache of hot rows on the device over
the full tables and their optimizer state in host memory (`docs/cache.md`)."""

from recsys.cache.config import CacheConfig, parse_load_factors
from recsys.cache.sharded import ShardedCachedTrainer
from recsys.cache.simulate import belady_hit_rate, policy_hit_rate
from recsys.cache.slots import CacheOverflow, CachePolicy, SlotMap
from recsys.cache.trainer import CachedState, CachedTrainer

__all__ = [
    "CacheConfig",
    "CacheOverflow",
    "CachePolicy",
    "CachedState",
    "CachedTrainer",
    "ShardedCachedTrainer",
    "SlotMap",
    "belady_hit_rate",
    "parse_load_factors",
    "policy_hit_rate",
]
