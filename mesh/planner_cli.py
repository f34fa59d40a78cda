"""The planner's command line: `python -m mesh.plan`, tables files, pictures, calibration."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence

import numpy as np

from mesh.cache_plan import plan_with_cache, zipf_hit_rate
from mesh.collectives import CommConfig
from mesh.cost import TableLoad, activation_bytes
from mesh.plan import ShardingPlan, validate_plan
from mesh.planner import PRESET_NAMES, PlanResult, evaluate_plan, mesh_for_topology, plan_tables
from mesh.routing import RoutingOptions
from mesh.topology import Topology
from pallas_kernels.fused_update.optimizers import OptimizerKind


def read_tables(data: dict) -> tuple[list[TableLoad], dict[str, float]]:
    """TABLES.json: {"tables": [{"name", "rows", "dim", "ids_per_sample"}, ...]} ->
    (TableLoads, {table: Zipf exponent}), with
    optional "bag_width" (static ids per sample; default ceil(ids_per_sample)),
    "element_bytes" (4), "state_bytes" (4), "optimizer" ("rowwise_adagrad"), "scaled"
    (false), "outputs" (pooled features reading the table, 1) and "zipf" (the exponent of
    its ids' Zipf law, for the hit rates of `--cache`; without it ids count as uniform)."""
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        raise ValueError('a tables file is a JSON object with a "tables" list')
    out, zipf = [], {}
    for i, entry in enumerate(data["tables"]):
        try:
            p = float(entry["ids_per_sample"])
            out.append(
                TableLoad(
                    name=str(entry["name"]),
                    rows=int(entry["rows"]),
                    dim=int(entry["dim"]),
                    ids_per_sample=p,
                    bag_width=int(entry.get("bag_width", max(1, math.ceil(p)))),
                    element_bytes=int(entry.get("element_bytes", 4)),
                    state_bytes=int(entry.get("state_bytes", 4)),
                    optimizer=str(entry.get("optimizer", OptimizerKind.ROWWISE_ADAGRAD.value)),
                    scaled=bool(entry.get("scaled", False)),
                    outputs=int(entry.get("outputs", 1)),
                )
            )
            if "zipf" in entry:
                zipf[str(entry["name"])] = float(entry["zipf"])
        except (KeyError, TypeError, ValueError) as e:
            name = entry.get("name", "?") if isinstance(entry, dict) else entry
            problem = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"tables[{i}] ({name}): {problem}") from None
    return out, zipf


def save_png(result: PlanResult, path: str) -> None:
    """Per-device memory and estimated time (exchanges, then lookups) as bars (needs
    matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install 'recsys-4d[plot]'") from None
    devices = np.arange(len(result.loads))
    fig, (mem, cost) = plt.subplots(2, 1, figsize=(max(6, len(devices) * 0.08), 6), sharex=True)
    mem.bar(devices, [load.memory / 1e9 for load in result.loads], width=1.0)
    mem.axhline(result.topology.memory / 1e9, color="red", linewidth=1, label="capacity")
    mem.set_ylabel("memory (GB)")
    mem.legend(loc="upper right")
    lookups = [1e3 * load.lookup_bytes / result.topology.hbm_bandwidth for load in result.loads]
    exchanges = [1e3 * t - x for t, x in zip(result.times, lookups)]
    cost.bar(devices, exchanges, width=1.0, color="tab:orange", label="exchanges")
    cost.bar(devices, lookups, bottom=exchanges, width=1.0, color="tab:green", label="lookups")
    cost.axhline(1e3 * result.lower_bound, color="black", linewidth=1, label="lower bound (mean)")
    cost.set_ylabel("estimated time (ms)")
    cost.set_xlabel("device")
    cost.legend(loc="upper right")
    fig.suptitle(
        f"{result.topology.name}: step {1e3 * result.step_time:.2f} ms, max/mean {result.balance:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibrate(rows: int = 1 << 20, dim: int = 128, batch: int = 1 << 16, repeats: int = 5) -> Topology:
    """Measures this machine's local devices: random-row gather bandwidth (the lookups)
    and all-to-all bandwidth between them (intra-host; one host has no inter-host link,
    so that figure repeats it). Memory is what the devices report, or the host's memory
    split over the devices."""
    import os

    import jax
    import jax.numpy as jnp

    from mesh import collectives
    from mesh.meshes import make_mesh

    def best_of(fn, *args) -> float:
        jax.block_until_ready(fn(*args))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return min(times)

    devices = jax.local_devices()
    table = jnp.ones((rows, dim), jnp.float32)
    ids = jax.random.randint(jax.random.key(0), (batch,), 0, rows)
    gather = jax.jit(lambda t, i: t[i].sum())
    hbm = batch * dim * 4 / best_of(gather, table, ids)
    intra = hbm
    if len(devices) > 1:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = make_mesh(len(devices), devices)
        axes = tuple(mesh.axis_names)
        chunk = (1 << 22) // len(devices)  # 16 MiB per device in all
        x = jax.device_put(
            jnp.ones((len(devices) * len(devices), chunk), jnp.float32), NamedSharding(mesh, P(axes))
        )
        mapped = collectives.ordered_shard_map(
            lambda v: collectives.all_to_all(v, axes), mesh=mesh, in_specs=P(axes), out_specs=P(axes)
        )
        moved = jax.jit(lambda v: mapped(None, v)[1])
        intra = (len(devices) - 1) * chunk * 4 / best_of(moved, x)
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    memory = (stats or {}).get("bytes_limit") or os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE"
    ) / len(devices)
    return Topology(
        hosts=1,
        devices_per_host=len(devices),
        memory=float(memory),
        hbm_bandwidth=hbm,
        intra_bandwidth=intra,
        inter_bandwidth=intra,
        name=f"calibrated {devices[0].platform}",
    )


def _without_empty_shards(plan: ShardingPlan) -> ShardingPlan:
    """Other planners list shards of no rows (TorchRec: a 3-row table over 8 devices);
    they hold and cost nothing, and our plans leave them out."""
    tables = {
        name: dataclasses.replace(p, shards=tuple(s for s in p.shards if s.size > 0))
        for name, p in plan.tables.items()
    }
    return ShardingPlan(tables, plan.mesh)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m mesh.plan --tables TABLES.json --topology SPEC --batch-size N [--json OUT] [--png OUT]
    python -m mesh.plan ... --evaluate PLAN.json   (score a given plan instead of planning)
    python -m mesh.plan --calibrate"""
    p = _parser()
    args = p.parse_args(argv)
    if args.calibrate:
        topo = calibrate()
        print(topo)
        print(
            f"hosts=1,devices={topo.devices_per_host},memory={topo.memory:.3g},hbm={topo.hbm_bandwidth:.3g},"
            f"intra={topo.intra_bandwidth:.3g},inter={topo.inter_bandwidth:.3g}"
        )
        return 0
    if not (args.tables and args.topology and args.batch_size):
        p.error("--tables, --topology and --batch-size are required (or --calibrate)")
    try:
        topo = Topology.parse(args.topology)
        result = _plan_or_evaluate(args, topo)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(topo)
    print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    if args.png:
        save_png(result, args.png)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mesh.plan", description="Plan table sharding without devices."
    )
    p.add_argument("--tables", help="TABLES.json")
    p.add_argument(
        "--topology", help="hosts=16,devices=8,memory=80GB or a preset: " + ", ".join(PRESET_NAMES)
    )
    p.add_argument("--batch-size", type=int, help="global batch")
    p.add_argument(
        "--calibrate", action="store_true", help="measure this machine and print its topology spec"
    )
    p.add_argument("--json", default=None, help="write the plan and per-device estimates here")
    p.add_argument("--png", default=None, help="write per-device memory and time bars here (matplotlib)")
    p.add_argument("--refine-seconds", type=float, default=5.0)
    p.add_argument(
        "--comm",
        default="",
        help="codecs of the results and their gradients, as recsys-train's --comm (fwd=fp16,bwd=bf16): "
        "the planner counts their bytes",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="where the tables do not fit the devices, cache some over host memory (hit rates "
        'from each table\'s "zipf" exponent)',
    )
    p.add_argument(
        "--evaluate",
        default=None,
        metavar="PLAN.json",
        help="score this plan (e.g. another planner's) under the cost model instead of planning",
    )
    return p


def _plan_or_evaluate(args, topo: Topology) -> PlanResult:
    routing = RoutingOptions(comm=CommConfig.parse(args.comm))
    with open(args.tables) as f:
        tables, zipf = read_tables(json.load(f))
    reserved = activation_bytes(tables, args.batch_size, topo.devices)
    options = dict(routing=routing, refine_seconds=args.refine_seconds, reserved_bytes=reserved)
    if args.cache and not args.evaluate:
        rows = {t.name: t.rows for t in tables}

        def hit_rate(table: str, factor: float) -> float:
            return zipf_hit_rate(rows[table], factor, zipf[table]) if table in zipf else factor

        return plan_with_cache(tables, topo, args.batch_size, hit_rate, **options)
    if not args.evaluate:
        return plan_tables(tables, topo, args.batch_size, **options)
    with open(args.evaluate) as f:
        given = _without_empty_shards(ShardingPlan.from_json(json.load(f)))
    mesh = given.mesh or mesh_for_topology(topo)
    if mesh.size != topo.devices:
        raise ValueError(f"the plan's mesh {mesh} has {mesh.size} devices; the topology has {topo.devices}")
    validate_plan(given, tables, mesh)
    return evaluate_plan(given, tables, topo, args.batch_size, routing=routing, reserved_bytes=reserved)
