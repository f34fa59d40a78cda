"""The planner: topology specs, the cost model's formulas on worked examples, the search,
its errors and its command line."""

import json

import pytest

from mesh import validate_plan
from mesh.cost import DeviceLoad, GroupTraffic, TableLoad, device_time
from mesh.planner import PlanningError, evaluate_plan, plan_tables
from mesh.planner_cli import calibrate, main, read_tables
from mesh.routing import RoutingOptions
from mesh.topology import Topology, parse_bytes


def test_topology_specs_and_presets():
    topo = Topology.parse("hosts=16,devices=8,memory=80GB")
    assert (topo.hosts, topo.devices_per_host, topo.devices, topo.memory) == (16, 8, 128, 80e9)
    h100 = Topology.parse("h100,hosts=4")
    assert h100.name == "h100" and h100.devices == 32 and h100.intra_bandwidth == 450e9
    assert parse_bytes("16GiB") == 2**34 and parse_bytes("1e9") == 1e9
    with pytest.raises(ValueError, match="presets: a100, cpu, h100"):
        Topology.parse("h200")
    with pytest.raises(ValueError, match="unknown topology key 'gpus'"):
        Topology.parse("gpus=8")
    with pytest.raises(ValueError, match="not a byte count"):
        Topology.parse("memory=lots")


# A worked example: 2 hosts x 2 devices, batch 8 (b = 2 per device), a 100 x 8 table
# read with 3 ids per sample (p = L = 3), fp32, row-wise Adagrad.
TOPO = Topology(
    hosts=2, devices_per_host=2, memory=1e6, hbm_bandwidth=1e3, intra_bandwidth=100.0, inter_bandwidth=10.0
)
TABLE = TableLoad("t", rows=100, dim=8, ids_per_sample=3, bag_width=3)


def test_memory_and_lookup_formulas():
    assert TABLE.memory(100, 8) == 100 * 8 * 4 + 100 * 4  # weights + one float per row
    assert TableLoad("a", 100, 8, 3, 3, optimizer="adam").memory(50, 4) == 50 * 4 * (4 + 8)
    # 8 samples x 3 ids, half the rows -> 12 rows read (once forward, read and written
    # backward); 4 columns of 4 bytes are 16 bytes, below one 32-byte transaction.
    assert TABLE.lookup_bytes(8, 50, 4) == 12 * 32 * 3
    assert TABLE.lookup_bytes(8, 100, 8) == 24 * 32 * 3


def traffic(*placements, k=4, width=8, row_sharded=False, rowwise=True, comm=None):
    """Bytes each device sends per step in a group of `width` columns on k = 4 devices at
    batch 8 (b = 2), and the route, for (table, [(device, rows, cols), ...]) placements."""
    g = GroupTraffic(k, width, row_sharded=row_sharded, data_parallel=False, rowwise_adagrad=rowwise)
    for table, shards in placements:
        g.add(table, shards)
    return g.bytes(8, comm or RoutingOptions())


def test_broadcast_route_formulas():
    # Table-wise on device 0: C = 3 ids and O = 1 vector per sample at the busiest owner;
    # every device sends each peer b * (C * 4 + O * w * (4 + 4)) = 2 * (12 + 64) bytes.
    assert traffic((TABLE, [(0, (0, 100), (0, 8))])) == (3 * 2 * (12 + 64), "broadcast")
    # Two column shards of 4 with row-wise Adagrad add the statistic's two exchanges,
    # 2 * b * C * 4 = 48 bytes per peer.
    split = [(0, (0, 100), (0, 4)), (1, (0, 100), (4, 8))]
    assert traffic((TABLE, split), width=4) == (3 * (2 * (12 + 32) + 48), "broadcast")
    assert traffic((TABLE, split), width=4, rowwise=False) == (3 * 2 * (12 + 32), "broadcast")
    # The busiest owner pads everyone: a second table on device 0 doubles C and O.
    other = TableLoad("u", rows=10, dim=8, ids_per_sample=3, bag_width=3)
    two = traffic((TABLE, [(0, (0, 100), (0, 8))]), (other, [(0, (0, 10), (0, 8))]))
    assert two == (3 * 2 * (24 + 128), "broadcast")
    apart = traffic((TABLE, [(0, (0, 100), (0, 8))]), (other, [(1, (0, 10), (0, 8))]))
    assert apart == traffic((TABLE, [(0, (0, 100), (0, 8))]))


ROW_BLOCKS = [(d, (25 * d, 25 * (d + 1)), (0, 8)) for d in range(4)]


def test_bucketized_route_and_data_parallel_formulas():
    # One id per sample over 4 row shards: each owner expects 1/4 id per sample, so
    # q = ceil(f * b / 4) = 1 slot per peer. Rows back: q * (4 + w * 8) = 68 bytes per peer,
    # against broadcast's 2 * (4 + 64) and pooled's 1 * 8 + 2 * 64.
    one = TableLoad("one", rows=100, dim=8, ids_per_sample=1, bag_width=1)
    assert traffic((one, ROW_BLOCKS), row_sharded=True) == (3 * 68, "rows")
    # Twelve ids per sample, capacity factor 1: q = ceil(1 * 2 * 3) = 6 slots of a row and
    # a position (8 bytes) per peer, and pooled results as on the broadcast route:
    # 6 * 8 + 2 * 64 = 176 bytes per peer, against broadcast's 2 * (48 + 64) and rows' 6 * 68.
    long = TableLoad("long", rows=100, dim=8, ids_per_sample=12, bag_width=12)
    tight = RoutingOptions(capacity_factor=1.0)
    assert traffic((long, ROW_BLOCKS), row_sharded=True, comm=tight) == (3 * 176, "pooled")
    # A grid (two column blocks of two row shards): an id goes to one shard per block, and
    # row-wise Adagrad's statistic takes 2 * q * 4 more per peer. Each owner expects 6 ids
    # per sample; at capacity factor 0.5, q = 6 and the exchanges are 6 * 8 + 2 * 32 = 112
    # per peer, against broadcast's 2 * (48 + 32).
    grid = [(d, (50 * (d % 2), 50 * (d % 2 + 1)), (4 * (d // 2), 4 * (d // 2 + 1))) for d in range(4)]
    half = RoutingOptions(capacity_factor=0.5)
    assert traffic((long, grid), width=4, row_sharded=True, comm=half) == (3 * (112 + 2 * 6 * 4), "pooled")
    # Data-parallel: every device gathers its peers' ids and gradients, (k - 1) * b * (L * 4 + D * 4).
    g = GroupTraffic(4, 8, row_sharded=False, data_parallel=True, rowwise_adagrad=True)
    g.add(TABLE, [])
    assert g.bytes(8, RoutingOptions()) == (3 * 2 * (12 + 32), "broadcast")


def test_device_time_takes_the_slower_link():
    # 300 bytes: a third stays on the host (1 of 3 peers): 100 / 100 B/s = 1 s intra,
    # 200 / 10 B/s = 20 s inter; plus 500 lookup bytes at 1000 B/s.
    load = DeviceLoad(memory=0, lookup_bytes=500, sent=300, received=120)
    assert device_time(load, TOPO) == pytest.approx(0.5 + 20)


MLPERF, _ = read_tables(json.load(open("examples/configs/mlperf_dcnv2_tables.json")))


@pytest.mark.parametrize("spec", ["h100", "h100,hosts=16", "h100,hosts=16,memory=16GB", "tpu-v5e,hosts=128"])
def test_planned_mlperf_tables_fit_and_beat_the_naive_plans(spec):
    topo = Topology.parse(spec)
    result = plan_tables(MLPERF, topo, 65_536, refine_seconds=1.0)
    validate_plan(result.plan, MLPERF, result.plan.mesh)
    assert max(load.memory for load in result.loads) <= topo.memory
    assert result.step_time >= result.lower_bound and result.step_time >= result.table_floor * (1 - 1e-9)
    from mesh.plan import plan_for_strategy

    for naive in ("row_wise",):
        baseline = evaluate_plan(plan_for_strategy(MLPERF, result.plan.mesh, naive), MLPERF, topo, 65_536)
        assert result.step_time < baseline.step_time, naive
    estimates = result.to_json()["estimates"]
    assert len(estimates["devices"]) == topo.devices and estimates["step_time_s"] == result.step_time


def test_an_infeasible_problem_says_what_is_missing_where():
    big = [TableLoad("huge", rows=10_000_000, dim=128, ids_per_sample=1, bag_width=1)]
    with pytest.raises(PlanningError, match=r"table 'huge'.*needs [\d.]+ GB more on device \d"):
        plan_tables(big, Topology.parse("hosts=1,devices=2,memory=1GB"), 64)
    with pytest.raises(PlanningError, match="does not split"):
        plan_tables(big, Topology.parse("hosts=1,devices=2,memory=100GB"), 63)


def test_tables_file_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"tables\[1\] \(b\)"):
        read_tables(
            {"tables": [{"name": "a", "rows": 1, "dim": 1, "ids_per_sample": 1}, {"name": "b", "rows": 2}]}
        )


def test_command_line_writes_the_plan_and_estimates(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["--tables", "examples/configs/mlperf_dcnv2_tables.json", "--topology", "a100,hosts=2"]
    assert main([*argv, "--batch-size", "4096", "--json", str(out), "--refine-seconds", "0.2"]) == 0
    written = json.loads(out.read_text())
    assert set(written["tables"]) == {t.name for t in MLPERF}
    assert written["mesh"] == {"host": 2, "device": 8}
    assert "max/mean" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown topology preset"):
        main(["--tables", argv[1], "--topology", "b200", "--batch-size", "64"])


def test_step_bytes_reproduce_the_compiled_benchmark_step():
    """`step_bytes` for the sharded benchmark's configuration (8 tables x 20,000 x 16,
    pooling 2, batch 1024, 8 devices) against the bytes `benchmarks.sharded` read from
    the compiled steps (README table): all-to-all, statistic and gathers, dense excluded."""
    from mesh import MeshSpec
    from mesh.plan import plan_for_strategy
    from mesh.planner import step_bytes

    tables = [TableLoad(f"t{i}", 20_000, 16, ids_per_sample=2, bag_width=2) for i in range(8)]
    measured = {  # from the README's table, minus the dense all-reduce (52,094 bytes)
        "table_wise": 121_856,
        "row_wise": 473_088,
        "column_wise": 286_720,
        "data_parallel": 516_096,
    }
    for strategy, want in measured.items():
        plan = plan_for_strategy(tables, MeshSpec.flat(8), strategy)
        assert step_bytes(plan, tables, 8, 1024) == pytest.approx(want, rel=1e-3), strategy


@pytest.mark.slow
def test_a_planned_dlrm_sends_the_estimated_bytes():
    """On 8 CPU devices the bytes the compiled step of a planner-made plan sends agree with
    the estimate. (That a planned DLRM trains like one device is
    `tests/test_train_cli.py::test_cli_auto_sharding_plans_and_matches_one_device`.)"""
    import jax
    import optax

    from mesh import make_mesh
    from mesh.collectives import collective_bytes
    from recsys.planning import table_loads
    from recsys.training import ShardedTrainer
    from tests.test_sharded_training import BATCH, CONFIG, batches, model

    loads = table_loads(CONFIG, {f.name: f.max_ids / 2 for f in CONFIG.features})
    result = plan_tables(loads, Topology.parse("cpu,devices=8"), BATCH, max_moves=50)
    trainer = ShardedTrainer(model(), optax.adam(0.01), result.plan, make_mesh(8))
    state = trainer.init_state()
    hlo = trainer.train_step.lower(state, trainer.shard_batch(next(batches()))).compile().as_text()
    dense = 2 * 7 / 8 * 4 * sum(x.size for x in jax.tree.leaves(state.params))
    measured = sum(collective_bytes(hlo, 8).values()) - dense
    # Measured here: 5,736 bytes against 5,712 estimated (the rest: the overflow flag's psum).
    assert measured == pytest.approx(result.collective_bytes, rel=0.02), (measured, result.collective_bytes)


def test_calibration_measures_the_local_devices():
    topo = calibrate(rows=1 << 12, dim=16, batch=1 << 10, repeats=1)
    assert topo.devices == 8 and topo.hbm_bandwidth > 0 and topo.intra_bandwidth > 0 and topo.memory > 0


def test_command_line_scores_a_given_plan(tmp_path, capsys):
    """`--evaluate` scores another planner's plan; shards of no rows (TorchRec lists them)
    are dropped, and a plan for another mesh is refused."""
    from mesh import MeshSpec
    from mesh.plan import plan_for_strategy

    plan = plan_for_strategy(MLPERF, MeshSpec.parse("host=2,device=8"), "table_row_wise").to_json()
    owner = plan["tables"]["c6"]["shards"][0]["device"]
    plan["tables"]["c6"]["shards"].append({"device": owner + 7, "rows": [3, 3], "cols": [0, 128]})
    path = tmp_path / "given.json"
    path.write_text(json.dumps(plan))
    argv = [
        "--tables",
        "examples/configs/mlperf_dcnv2_tables.json",
        "--batch-size",
        "4096",
        "--evaluate",
        str(path),
    ]
    assert main([*argv, "--topology", "a100,hosts=2"]) == 0
    out = capsys.readouterr().out
    assert "table_row_wise" in out and "max/mean" in out and "planned in" not in out
    with pytest.raises(SystemExit, match="16 devices; the topology has 8"):
        main([*argv, "--topology", "a100"])


def test_a_run_plans_with_measured_or_given_figures_on_its_own_mesh():
    from mesh import MeshSpec
    from mesh.planner import topology_for_mesh

    spec = MeshSpec.parse("host=2,device=4")
    preset = topology_for_mesh(spec, "cpu", 3e9)
    assert (preset.hosts, preset.devices_per_host, preset.memory) == (2, 4, 3e9)
    measured = Topology.parse("hosts=1,devices=8,memory=5e9,hbm=7e9,intra=3e9,inter=3e9")
    topo = topology_for_mesh(spec, "cpu", 3e9, measured)
    assert (topo.hosts, topo.devices_per_host) == (2, 4)  # the mesh's shape
    assert (topo.memory, topo.hbm_bandwidth, topo.intra_bandwidth) == (5e9, 7e9, 3e9)  # the figures given


def test_command_line_draws_the_plan(tmp_path):
    pytest.importorskip("matplotlib", reason="--png needs the `plot` extra (matplotlib)")
    out = tmp_path / "plan.png"
    argv = ["--tables", "examples/configs/mlperf_dcnv2_tables.json", "--topology", "a100,hosts=2"]
    assert main([*argv, "--batch-size", "4096", "--png", str(out), "--refine-seconds", "0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
