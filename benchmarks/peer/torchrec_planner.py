"""TorchRec's sharding planner on our table files: plan with it, or score any plan under its
cost model. Runs in the TorchRec venv (see ../shared/bench/torchrec_peer.py for how to
install TorchRec 1.8 + fbgemm-gpu-cpu), not in ours; it reads and writes our formats:

    TR=/tmp/torchrec-venv/bin/python
    # TorchRec's plan, in our plan schema (mesh/plan), plus its own estimate:
    $TR benchmarks/peer/torchrec_planner.py plan examples/configs/mlperf_dcnv2_tables.json \
        --world 128 --local 8 --hbm 80e9 --batch-size 65536 --out torchrec128.json
    # any plan in our schema (ours from `python -m mesh.plan --json`, or TorchRec's) under
    # TorchRec's estimator (EmbeddingPerfEstimator, per rank, ms):
    $TR benchmarks/peer/torchrec_planner.py score examples/configs/mlperf_dcnv2_tables.json \
        ours128.json --world 128 --local 8 --hbm 80e9 --batch-size 65536
    # and TorchRec's plan under our cost model:
    python -m mesh.plan --tables examples/configs/mlperf_dcnv2_tables.json \
        --topology h100,hosts=16 --batch-size 65536 --evaluate torchrec128.json

Tables carry row-wise Adagrad state (EXACT_ROWWISE_ADAGRAD, fused kernels) and their
`ids_per_sample` as TorchRec pooling factors. Scoring replaces the shards of TorchRec's
option of the same sharding type with the plan's (sizes, offsets, ranks) and reruns its
estimators; scoring TorchRec's own plan reproduces its planner's figures.
"""

import argparse
import copy
import json
import time

STRATEGIES = {  # ours -> TorchRec's sharding types
    "table_wise": "table_wise",
    "row_wise": "row_wise",
    "column_wise": "column_wise",
    "data_parallel": "data_parallel",
    "table_row_wise": "table_row_wise",
    "table_column_wise": "table_column_wise",
    "grid": "grid_shard",
}


def setup(args):
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import ParameterConstraints, Topology

    with open(args.tables) as f:
        tables = json.load(f)["tables"]
    configs = [
        EmbeddingBagConfig(
            name=t["name"], embedding_dim=t["dim"], num_embeddings=t["rows"], feature_names=[t["name"]]
        )
        for t in tables
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    constraints = {
        t["name"]: ParameterConstraints(
            pooling_factors=[float(t["ids_per_sample"])], sharding_types=list(STRATEGIES.values())
        )
        for t in tables
    }
    topo = Topology(
        world_size=args.world, local_world_size=args.local, compute_device="cuda", hbm_cap=int(args.hbm)
    )
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})
    return tables, ebc, constraints, topo, sharder


def per_rank(options, world: int) -> dict:
    perf, hbm = [0.0] * world, [0.0] * world
    for option in options:
        for shard in option.shards:
            perf[shard.rank] += shard.perf.total
            hbm[shard.rank] += shard.storage.hbm
    mean = sum(perf) / world
    return {
        "max_ms": max(perf),
        "mean_ms": mean,
        "max_over_mean": max(perf) / mean,
        "peak_hbm_bytes": max(hbm),
    }


def plan(args) -> dict:
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    tables, ebc, constraints, topo, sharder = setup(args)
    planner = EmbeddingShardingPlanner(
        topology=topo, batch_size=args.batch_size // args.world, constraints=constraints
    )
    start = time.perf_counter()
    result = planner.plan(ebc, [sharder])
    seconds = time.perf_counter() - start
    back = {v: k for k, v in STRATEGIES.items()}
    rows = {t["name"]: t["rows"] for t in tables}
    out = {}
    for name, ps in result.plan[""].items():
        if ps.sharding_type == "data_parallel":
            dim = next(t["dim"] for t in tables if t["name"] == name)
            shards = [{"device": r, "rows": [0, rows[name]], "cols": [0, dim]} for r in range(args.world)]
        else:
            shards = []
            for s in ps.sharding_spec.shards:
                rank = int(str(s.placement).split("rank:")[1].split("/")[0])
                (r0, c0), (rs, cs) = s.shard_offsets, s.shard_sizes
                shards.append({"device": rank, "rows": [r0, r0 + rs], "cols": [c0, c0 + cs]})
        out[name] = {"strategy": back[ps.sharding_type], "shards": shards}
    mesh = (
        {"host": args.world // args.local, "device": args.local}
        if args.world > args.local
        else {"device": args.world}
    )
    return {
        "mesh": mesh,
        "tables": out,
        "torchrec": {"planning_s": seconds, **per_rank(planner._best_plan, args.world)},
    }


def score(args) -> dict:
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.types import Shard

    _, ebc, constraints, topo, sharder = setup(args)
    with open(args.plan) as f:
        tables = json.load(f)["tables"]
    enumerator = EmbeddingEnumerator(
        topology=topo, batch_size=args.batch_size // args.world, constraints=constraints
    )
    options = enumerator.enumerate(ebc, [sharder])
    chosen = []
    for name, p in tables.items():
        kind = STRATEGIES[p["strategy"]]
        match = [
            o for o in options if o.name == name and o.sharding_type == kind and o.compute_kernel == "fused"
        ]
        if not match:
            raise SystemExit(f"table {name!r}: TorchRec enumerates no fused {kind} option")
        option = copy.deepcopy(match[0])
        option.shards = [
            Shard(
                size=[s["rows"][1] - s["rows"][0], s["cols"][1] - s["cols"][0]],
                offset=[s["rows"][0], s["cols"][0]],
                rank=s["device"],
            )
            for s in p["shards"]
        ]
        chosen.append(option)
    for estimator in enumerator._estimators:
        estimator.estimate(chosen, enumerator._sharder_data_map)
    return per_rank(chosen, args.world)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["plan", "score"])
    p.add_argument("tables")
    p.add_argument("plan", nargs="?", help="score: a plan in our schema")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--local", type=int, default=8)
    p.add_argument("--hbm", type=float, default=80e9)
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--out", default=None, help="plan: write the plan JSON here")
    args = p.parse_args()
    if args.command == "score":
        if not args.plan:
            p.error("score needs a plan file")
        print(json.dumps(score(args)))
        return
    result = plan(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "torchrec"}, f)
    print(json.dumps(result["torchrec"]))


if __name__ == "__main__":
    main()
