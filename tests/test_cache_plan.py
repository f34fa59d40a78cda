"""Planning with a cache: a cached table's memory and host traffic in the cost model,
the planner caching tables that do not fit, its report, and the command lines."""

import json

import pytest

from mesh.cache_plan import CACHE_FACTORS, plan_with_cache, zipf_hit_rate
from mesh.cost import DeviceLoad, TableLoad, activation_bytes, device_time
from mesh.plan import Strategy
from mesh.planner import PlanningError, plan_tables
from mesh.planner_cli import main
from mesh.topology import Topology

# 1M x 64 float32 rows with one row-wise Adagrad float each: 260 MB.
BIG = TableLoad("big", rows=1_000_000, dim=64, ids_per_sample=2, bag_width=2)
SMALL = TableLoad("small", rows=1000, dim=64, ids_per_sample=1, bag_width=1)
TOPO = Topology.parse("cpu,hosts=1,devices=4,memory=50MB,host=10GB")


def test_a_cached_table_costs_its_slots_staging_and_host_traffic():
    cached = TableLoad("big", 1_000_000, 64, 2, 2, cache_factor=0.1, hit_rate=0.9)
    row = 64 * 4 + 4
    # Misses per step: 1024 samples x 2 ids x 10%; a fill and a victim buffer of them.
    misses = 1024 * 2 * 0.1
    assert cached.memory(1_000_000, 64, batch=1024) == pytest.approx(100_000 * row + 2 * misses * row)
    assert cached.host_memory(1_000_000, 64) == 1_000_000 * row
    assert cached.host_bytes(1024, 1_000_000, 64) == pytest.approx(2 * misses * row)
    assert BIG.host_bytes(1024, 1_000_000, 64) == 0.0
    # The host link's time adds to the device's.
    load = DeviceLoad(lookup_bytes=0.0, host_bytes=1e9)
    assert device_time(load, TOPO) == pytest.approx(0.1)


def test_the_batch_activations_are_counted():
    # 1024 samples over 4 devices, two tables of 64 columns, float32, values and gradients.
    assert activation_bytes([BIG, SMALL], 1024, 4) == 256 * 128 * 4 * 2
    result = plan_tables([SMALL], TOPO, 1024, reserved_bytes=5e6)
    assert all(load.memory >= 5e6 for load in result.loads)


def test_zipf_hit_rates_grow_with_the_cache_and_follow_the_skew():
    rates = [zipf_hit_rate(1_000_000, f, 1.05) for f in (0.01, 0.1, 0.5)]
    assert 0.5 < rates[0] < rates[1] < rates[2] < 1
    assert zipf_hit_rate(1_000_000, 0.1, 0.5) < rates[1]  # flatter ids hit less
    assert zipf_hit_rate(1000, 1.0, 1.05) == 1.0


def test_tables_that_do_not_fit_are_cached_and_the_rest_stay_whole():
    with pytest.raises(PlanningError, match="table 'big'"):
        plan_tables([BIG, SMALL], TOPO, 1024)
    result = plan_with_cache([BIG, SMALL], TOPO, 1024, lambda t, f: zipf_hit_rate(1_000_000, f, 1.05))
    assert set(result.cache) == {"big"}
    factor = result.cache["big"]["load_factor"]
    assert factor in CACHE_FACTORS and factor < 1
    assert all(load.memory <= TOPO.memory for load in result.loads)
    # A cached table keeps its rows whole on its owners.
    assert not result.plan.tables["big"].strategy.row_sharded
    assert result.host_memory == [pytest.approx(BIG.host_memory(BIG.rows, BIG.dim), rel=0.01)]
    assert max(load.host_bytes for load in result.loads) > 0
    text = str(result)
    assert "cached table" in text and "host 0: 260.00 MB" in text
    assert result.to_json()["estimates"]["cache"]["big"]["load_factor"] == factor


def test_a_lower_hit_rate_costs_host_link_time():
    def plan(rate):
        return plan_with_cache([BIG, SMALL], TOPO, 1024, lambda t, f: rate)

    assert plan(0.5).step_time > plan(0.99).step_time


def test_no_cache_small_enough_says_so():
    tiny = Topology.parse("cpu,hosts=1,devices=4,memory=1MB")
    with pytest.raises(PlanningError, match="cached at 1% of its rows it still does not fit"):
        plan_with_cache([BIG], tiny, 1024, lambda t, f: 0.5)
    # A cache size that cannot hold a batch is never chosen (None), whatever it would free.
    result = plan_with_cache([BIG, SMALL], TOPO, 1024, lambda t, f: None if f < 0.2 else 0.9)
    assert result.cache["big"]["load_factor"] >= 0.2
    assert Strategy(result.plan.tables["big"].strategy) is not Strategy.ROW_WISE


def test_mesh_plan_shows_cached_tables_and_host_memory(tmp_path, capsys):
    tables = tmp_path / "tables.json"
    entries = [{"name": "big", "rows": 1_000_000, "dim": 64, "ids_per_sample": 2, "zipf": 1.05}]
    entries.append({"name": "small", "rows": 1000, "dim": 64, "ids_per_sample": 1})
    tables.write_text(json.dumps({"tables": entries}))
    out = tmp_path / "plan.json"
    argv = [
        "--tables",
        str(tables),
        "--topology",
        "cpu,hosts=1,devices=4,memory=50MB",
        "--batch-size",
        "1024",
    ]
    assert main([*argv, "--cache", "--json", str(out), "--refine-seconds", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "cached table" in printed and "host memory of cached tables: host 0:" in printed
    estimates = json.loads(out.read_text())["estimates"]
    assert set(estimates["cache"]) == {"big"} and estimates["host_memory_bytes"][0] > 2e8
