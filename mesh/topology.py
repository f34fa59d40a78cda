"""Two-level device topologies for the planner: hosts x devices, memory and bandwidths.

A `Topology` is what the cost model (`mesh.cost`) needs to know of the machines: how
many hosts and devices per host, each device's memory, how fast a device reads its own
memory (embedding lookups are bandwidth-bound), and the per-device bandwidth of the two
link levels: within a host (NVLink, TPU ICI) and across hosts (InfiniBand / DCN).

Spec strings read like `hosts=16,devices=8,memory=80GB` or a preset name, optionally
followed by overrides: `h100,hosts=16`, `tpu-v5p,hosts=4,devices=64`. Bandwidths are
bytes per second with the same unit suffixes (`intra=450GB`).

Preset figures are public peak numbers per device, rounded: what the planner compares is
ratios between devices and links, and `python -m mesh.plan --calibrate` measures this
machine instead.
"""

from __future__ import annotations

import dataclasses
import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclasses.dataclass(frozen=True)
class Topology:
    hosts: int
    devices_per_host: int
    memory: float  # bytes per device
    hbm_bandwidth: float  # bytes/s a device reads from its own memory (random rows)
    intra_bandwidth: float  # bytes/s one device sends to peers on its host
    inter_bandwidth: float  # bytes/s one device sends to other hosts
    name: str = "custom"
    # bytes/s between a device and its host's memory (PCIe or the host DMA link): what a
    # cached table's misses and write-backs cross.
    host_bandwidth: float = 25e9

    def __post_init__(self):
        for field in ("hosts", "devices_per_host"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"topology {field} must be a positive int, got {getattr(self, field)!r}")
        for field in ("memory", "hbm_bandwidth", "intra_bandwidth", "inter_bandwidth", "host_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"topology {field} must be positive, got {getattr(self, field)!r}")

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    def host_of(self, device: int) -> int:
        return device // self.devices_per_host

    @classmethod
    def parse(cls, spec: str) -> Topology:
        """`hosts=H,devices=D,memory=80GB[,hbm=..,intra=..,inter=..]`, a preset name, or a
        preset followed by overrides. Unknown keys and presets are errors listing choices."""
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty topology spec")
        base = dict(_CPU)
        name = "custom"
        if "=" not in parts[0]:
            preset = parts.pop(0).lower()
            if preset not in PRESETS:
                raise ValueError(f"unknown topology preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
            base, name = dict(PRESETS[preset]), preset
        keys = {"hosts": "hosts", "devices": "devices_per_host", "memory": "memory"}
        keys.update(
            hbm="hbm_bandwidth", intra="intra_bandwidth", inter="inter_bandwidth", host="host_bandwidth"
        )
        for part in parts:
            key, _, value = part.partition("=")
            if key not in keys:
                raise ValueError(f"unknown topology key {key!r} in {spec!r}; keys: {', '.join(keys)}")
            field = keys[key]
            base[field] = int(value) if field in ("hosts", "devices_per_host") else parse_bytes(value)
        return cls(name=name, **base)

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.hosts} hosts x {self.devices_per_host} devices, "
            f"{self.memory / 1e9:.1f} GB, hbm {self.hbm_bandwidth / 1e9:.0f} GB/s, "
            f"intra {self.intra_bandwidth / 1e9:.1f} GB/s, inter {self.inter_bandwidth / 1e9:.1f} GB/s, "
            f"host {self.host_bandwidth / 1e9:.1f} GB/s"
        )


def format_bytes(n: float) -> str:
    """8e10 -> '80.00 GB', 1.2e5 -> '120.00 KB' (decimal units, as `parse_bytes` reads)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if abs(n) >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.2f} {unit}"
    return f"{n:.0f} B"


def parse_bytes(text: str) -> float:
    """'80GB' -> 8e10; '16GiB' -> 2**34; a plain number is bytes."""
    match = re.fullmatch(r"\s*([\d.]+(?:E\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"not a byte count: {text!r} (e.g. 80GB, 16GiB, 1e9)")
    return float(match[1]) * _UNITS[match[2]]


# Per-device figures: memory, HBM read bandwidth, per-device bandwidth within a host and
# across hosts. Sources: vendor data sheets (H100 SXM, A100 SXM 80GB, TPU v5e / v5p / v6e
# system architecture pages); inter-host = one 400 Gb/s (H100) or 200 Gb/s (A100) NIC per
# GPU, TPU data-center network per chip. Host link: PCIe Gen5 x16 (H100) or Gen4 x16
# (A100, TPU hosts), one direction, per device; on the CPU the "host" copy is a memcpy.
def _preset(
    devices_per_host: int, memory: float, hbm: float, intra: float, inter: float, host: float
) -> dict:
    return dict(
        hosts=1,
        devices_per_host=devices_per_host,
        memory=memory,
        hbm_bandwidth=hbm,
        intra_bandwidth=intra,
        inter_bandwidth=inter,
        host_bandwidth=host,
    )


_CPU = _preset(8, memory=2e9, hbm=2e9, intra=4e9, inter=1e9, host=2e9)
PRESETS: dict[str, dict] = {
    "h100": _preset(8, memory=80e9, hbm=3.35e12, intra=450e9, inter=50e9, host=64e9),
    "a100": _preset(8, memory=80e9, hbm=2.0e12, intra=300e9, inter=25e9, host=32e9),
    "tpu-v5e": _preset(8, memory=16e9, hbm=819e9, intra=200e9, inter=12.5e9, host=32e9),
    "tpu-v5p": _preset(4, memory=95e9, hbm=2.76e12, intra=600e9, inter=25e9, host=32e9),
    "tpu-v6e": _preset(8, memory=32e9, hbm=1.64e12, intra=448e9, inter=25e9, host=32e9),
    "cpu": _CPU,
}
