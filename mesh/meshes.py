"""Device meshes with named axes, from a short spec.

    make_mesh("device=8")           # one axis over 8 devices
    make_mesh("host=2,device=4")    # two levels, like 2 GPU nodes x 4 GPUs or 2 TPU slices

The axis names are the spec's keys, in order; the product of the sizes must equal the
number of devices used. The batch is sharded over all axes together; table shards are
placed by a `ShardingPlan`, whose global device index D is the position of a device in
`mesh.devices.flat` (row-major, so on a host x device mesh D = host * devices_per_host +
device).

Devices are ordered by (process, id), so in a multi-process job the leading axis of a
host x device mesh runs over processes and each process owns one contiguous "host" row.
On TPU, `jax.make_mesh` orders devices by the physical topology instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Named axis sizes, outermost first: (("host", 2), ("device", 4))."""

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self):
        if not self.axes:
            raise ValueError("a mesh needs at least one axis")
        names = [name for name, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axis names repeat: {names}")
        for name, size in self.axes:
            if not name.isidentifier():
                raise ValueError(f"mesh axis name {name!r} is not an identifier")
            if size < 1:
                raise ValueError(f"mesh axis {name!r} has size {size}; sizes must be >= 1")

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """'host=2,device=4' -> MeshSpec((('host', 2), ('device', 4)))."""
        axes = []
        for part in (p.strip() for p in text.split(",")):
            name, sep, size = part.partition("=")
            if not sep or not size.strip().isdigit():
                raise ValueError(f"mesh spec {text!r}: expected name=size[,name=size...], got {part!r}")
            axes.append((name.strip(), int(size)))
        return cls(tuple(axes))

    @classmethod
    def flat(cls, devices: int) -> MeshSpec:
        return cls((("device", devices),))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.axes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def hosts(self) -> int:
        """Size of the outer level: the leading axis of a two-level mesh, else 1."""
        return self.shape[0] if len(self.axes) > 1 else 1

    @property
    def devices_per_host(self) -> int:
        return self.size // self.hosts

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.axes)


def make_mesh(spec: MeshSpec | str | int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A `jax.sharding.Mesh` with the spec's named axes.

    Args:
      spec: a MeshSpec, its text form, or a device count (one axis named "device").
      devices: the devices to use (default: all of `jax.devices()`); their count must
        equal the spec's size.
    """
    if isinstance(spec, int):
        spec = MeshSpec.flat(spec)
    elif isinstance(spec, str):
        spec = MeshSpec.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != spec.size:
        raise ValueError(
            f"mesh {spec} needs {spec.size} devices, {len(devices)} are available"
            + (
                " (on CPU, simulate more with --xla_force_host_platform_device_count)"
                if devices[0].platform == "cpu"
                else ""
            )
        )
    devices.sort(key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(devices, dtype=object).reshape(spec.shape), spec.names)


def mesh_spec(mesh: jax.sharding.Mesh) -> MeshSpec:
    return MeshSpec(tuple((name, int(size)) for name, size in mesh.shape.items()))


def simulate_cpu_devices(count: int) -> None:
    """On CPU, asks JAX for `count` simulated devices (a mesh on one machine); a no-op once
    JAX has started (tests set their 8 devices in conftest) or on GPU/TPU."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # backends already initialized: keep what is there
        pass
