"""The planner on a table set: planning time, estimated step, balance, memory, against naive plans.

    python -m benchmarks.planner                         # MLPerf DCNv2 tables, H100s
    python -m benchmarks.planner --devices 8 128 --memory 16GB --preset tpu-v5p
    python -m benchmarks.planner --presets h100 tpu-v5p tpu-v6e --devices 8 64 128 --memory preset

One JSON line per (preset, devices, memory): our plan's estimated step time (the slowest
device under `mesh.cost`) and the samples/s it implies at the batch size, max/mean,
both lower bounds, peak memory / capacity and bytes sent per device, and the same
figures for two naive plans: every table table-wise round robin, and every table
row-wise. No devices are needed.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default="examples/configs/mlperf_dcnv2_tables.json")
    p.add_argument("--presets", nargs="+", default=["h100"], help="topology presets (mesh.topology)")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 128, 1024], help="per host: the preset's")
    p.add_argument("--memory", nargs="+", default=["80GB", "16GB"], help="per device; preset: the preset's")
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--refine-seconds", type=float, default=5.0)
    args = p.parse_args(argv)

    from mesh.plan import Shard, ShardingPlan, TablePlan, plan_for_strategy
    from mesh.planner import PlanningError, evaluate_plan, plan_tables
    from mesh.planner_cli import read_tables
    from mesh.topology import PRESETS, Topology

    with open(args.tables) as f:
        tables, _ = read_tables(json.load(f))
    for preset, memory, devices in itertools.product(args.presets, args.memory, args.devices):
        if memory == "preset":
            memory = f"{PRESETS[preset]['memory'] / 1e9:g}GB"
        per_host = PRESETS[preset]["devices_per_host"]
        hosts = max(1, devices // per_host)
        topo = Topology.parse(f"{preset},hosts={hosts},devices={devices // hosts},memory={memory}")
        record = {"bench": "planner", "preset": preset, "devices": topo.devices, "memory": memory}
        try:
            ours = plan_tables(tables, topo, args.batch_size, refine_seconds=args.refine_seconds)
        except PlanningError as e:
            print(json.dumps({**record, "error": str(e)}), flush=True)
            continue
        mesh = ours.plan.mesh
        round_robin = ShardingPlan(
            {
                t.name: TablePlan("table_wise", (Shard(i % topo.devices, (0, t.rows), (0, t.dim)),))
                for i, t in enumerate(tables)
            },
            mesh,
        )
        record.update(_figures(ours), plan_s=round(ours.seconds, 2))
        record["samples_per_s"] = round(args.batch_size / ours.step_time)
        record["strategies"] = dict(collections.Counter(p.strategy.value for p in ours.plan.tables.values()))
        for name, plan in (
            ("table_wise_round_robin", round_robin),
            ("row_wise", plan_for_strategy(tables, mesh, "row_wise")),
        ):
            record[name] = _figures(evaluate_plan(plan, tables, topo, args.batch_size))
        print(json.dumps(record), flush=True)
    return 0


def _figures(result) -> dict:
    peak = max(load.memory for load in result.loads) / result.topology.memory
    return {
        "step_ms": round(1e3 * result.step_time, 3),
        "max_over_mean": round(result.balance, 3),
        "bound_mean_ms": round(1e3 * result.lower_bound, 3),
        "bound_table_ms": round(1e3 * result.table_floor, 3),
        "peak_memory_over_capacity": round(peak, 3),
        "fits": peak <= 1.0,
        "sent_mb_per_device": round(result.collective_bytes / 1e6, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
