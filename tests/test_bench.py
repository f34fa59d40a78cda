import json

from benchmarks import bench


def test_bench_prints_one_json_line_per_measurement(capsys):
    bench.main(
        [
            "--tables",
            "3",
            "--rows",
            "200",
            "--dim",
            "8",
            "--batch",
            "64",
            "--pooling",
            "1",
            "3",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--num-batches",
            "2",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["pooling"]) for r in lines] == [
        (name, pooling)
        for pooling in (1, 3)
        for name in ("lookup_fwd", "lookup_fwd_bwd_adagrad", "dlrm_train_step")
    ]
    assert all(r["samples_per_s"] > 0 for r in lines)


def test_input_benchmark_prints_every_path(capsys):
    from benchmarks import input as bench_input

    assert bench_input.main(["--steps", "2", "--warmup", "1", "--repeats", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == [
        "synthetic",
        "in_memory",
        "binary",
        "text_cached",
        "text_reparsed",
        "text_reparsed_no_prefetch",
    ]
    assert all(r["samples_per_s"] > 0 for r in records)


def test_sharded_benchmark_reports_bytes_sent(capsys):
    from benchmarks import sharded as bench_sharded

    argv = ["--tables", "2", "--rows", "100", "--dim", "8", "--batch", "64", "--steps", "1", "--warmup", "1"]
    assert bench_sharded.main([*argv, "--strategies", "row_wise", "data_parallel"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["strategy"] for r in records] == ["single_device", "row_wise", "data_parallel"]
    assert records[0]["bytes_sent_per_device"] == 0
    # Row-wise routes ids, pooled activations and their gradients with all-to-alls (plus
    # the dense all-reduce); data-parallel tables gather ids and gradients instead.
    assert records[1]["bytes_by_collective"]["all-to-all"] > 0
    assert "all-to-all" not in records[2]["bytes_by_collective"]
    assert records[2]["bytes_by_collective"]["all-gather"] > 0


def test_sharded_benchmark_compares_pipelines(capsys):
    from benchmarks import sharded as bench_sharded

    argv = ["--tables", "2", "--rows", "100", "--dim", "8", "--batch", "64", "--steps", "2", "--rounds", "2"]
    assert bench_sharded.main([*argv, "--strategies", "table_wise", "--pipeline", "none", "sparse_dist"]) == 0
    record = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert record["bench"] == "pipeline" and record["strategy"] == "table_wise"
    assert record["none_samples_per_s"] > 0 and record["sparse_dist_samples_per_s"] > 0
    assert len(record["per_round"]["sparse_dist"]) == 2 and record["routing_ms"] > 0


def test_overlap_benchmark_reads_the_compiled_step(capsys):
    """On CPU every collective is synchronous; the script reads them all by purpose."""
    from benchmarks import overlap as bench_overlap

    argv = ["--cpu", "--tables", "2", "--rows", "100", "--dim", "8", "--batch", "64"]
    assert bench_overlap.main([*argv, "--strategies", "table_wise", "--pipeline", "sparse_dist"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["pipeline"] == "sparse_dist" and record["devices"] == 8
    ids = record["by_purpose"]["ids"]
    assert ids["collectives"] >= 1 and ids["async"] == 0 and record["by_purpose"]["fwd"]["collectives"] >= 1


def test_planner_benchmark_compares_with_naive_plans(capsys):
    from benchmarks import planner as bench_planner

    assert bench_planner.main(["--devices", "8", "--memory", "16GB", "--refine-seconds", "0.2"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["devices"] == 8 and record["step_ms"] > 0
    assert not record["table_wise_round_robin"]["fits"] and record["row_wise"]["step_ms"] > record["step_ms"]
    implied = 65_536 / (record["step_ms"] / 1e3)  # the batch over the estimated step
    assert abs(record["samples_per_s"] - implied) < 1e-3 * implied
    argv = ["--presets", "tpu-v5p", "--devices", "8", "--memory", "preset", "--refine-seconds", "0.2"]
    assert bench_planner.main(argv) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (record["preset"], record["memory"], record["devices"]) == ("tpu-v5p", "95GB", 8)


def test_gpu_check_reports_bandwidth_and_ratios(capsys):
    """`--smoke` runs the GPU check's code on tiny shapes (interpreted on CPU)."""
    from benchmarks import gpu as bench_gpu

    bench_gpu.main(["--smoke"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [r["name"] for r in records]
    assert names == ["lookup_fwd_xla", "lookup_fwd_pallas", "sparse_update_xla", "sparse_update_pallas"]
    fwd = records[1]
    assert fwd["useful_gbps"] >= 0 and fwd["vs_xla"] > 0 and fwd["fraction_of_copy"] > 0
    assert fwd["bags_per_step"] == 16 and records[3]["vs_xla"] > 0
    assert (
        bench_gpu.peak_bandwidth(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})(), None) == 3.35e12
    )
    assert bench_gpu.peak_bandwidth(type("D", (), {"device_kind": "NVIDIA H200"})(), None) == 4.8e12
    assert bench_gpu.peak_bandwidth(object(), 1000.0) == 1e12


def test_cache_benchmark_prints_hit_rates_and_the_cached_step(capsys):
    from benchmarks import cache as bench_cache

    small = [
        "--batches",
        "30",
        "--trace-rows",
        "3000",
        "--trace-ids",
        "300",
        "--tables",
        "2",
        "--rows",
        "2000",
    ]
    small += ["--dim", "8", "--batch", "256", "--steps", "3", "--rounds", "2", "--warmup", "4"]
    bench_cache.main(small)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    zipf = [r for r in records if r["name"] == "cache_hit_rate" and r["trace"] == "zipf"]
    assert [r["cache_size"] for r in zipf] == [0.05, 0.1, 0.2, 0.5]
    for r in zipf:
        assert max(r["lru"], r["lfu"], r["lookahead"]) <= r["belady"] + 1e-9
    (step,) = [r for r in records if r["name"] == "cache_step"]
    assert step["pipelined_samples_per_s"] > 0 and 0 < step["cache_hit_rate"] < 1


def test_defaults_benchmark_ranks_grid_points_by_validation_loss(capsys, tmp_path):
    from benchmarks import defaults

    small = ["train-samples=2048", "eval-samples=512", "num-tables=3", "rows=50", "lr=0.05,0.1"]
    argv = ["--datasets", "synthetic", "--models", "lr", "--grid", *small, "--out", str(tmp_path)]
    assert defaults.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    runs = [r for r in lines if not r.get("summary")]
    assert [r["flags"].split()[-1] for r in runs] == ["0.05", "0.1"]
    assert all(r["stopped_early"] is not None and r["best_step"] <= r["steps"] for r in runs)
    summaries = [r for r in lines if r.get("summary")]
    assert [s["validation_logloss"] for s in summaries] == sorted(r["validation_logloss"] for r in runs)
    assert defaults.grid_points(["lr=1,2", "seed=3"]) == [
        ["--lr", "1", "--seed", "3"],
        ["--lr", "2", "--seed", "3"],
    ]
