"""Every collective of a program runs in one order on every device (`mesh.collectives.ordering`),
and a step that stalls anyway ends with one clear error line."""

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mesh import collectives, make_mesh
from mesh.collectives.hlo import overlap
from recsys.cli.watchdog import StepWatchdog, xla_collective_timeouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_collectives(x, y):
    """A psum and an all-gather, which the chain orders."""
    return collectives.sum_over(x, ("d",)), collectives.gather_batch(y, ("d",))


def _compiled(fn, mesh, *args):
    return fn.lower(*args).compile().as_text()


def test_unordered_collectives_finds_what_only_the_chain_orders():
    mesh = make_mesh(8)
    mesh = jax.sharding.Mesh(mesh.devices, ("d",))
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d")))
    raw = jax.jit(
        jax.shard_map(
            lambda x, y: (jax.lax.psum(x, "d"), jax.lax.all_gather(y, "d", tiled=True, to="invarying")),
            mesh=mesh,
            in_specs=(P("d"), P("d")),
            out_specs=(P(), P()),
        )
    )
    assert collectives.unordered_collectives(_compiled(raw, mesh, x, x))
    mapped = collectives.ordered_shard_map(
        _two_collectives, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P(), P())
    )
    ordered = jax.jit(lambda x, y: mapped(None, x, y)[1])
    assert collectives.unordered_collectives(_compiled(ordered, mesh, x, x)) == []
    total, gathered = ordered(x, x)
    assert float(total[0]) == 28.0 and np.array_equal(gathered, np.arange(8.0))


def test_a_cond_continues_the_chain():
    """The branch taken follows the collectives before the cond, and those after it follow
    the branch; both branches give the same results as without the chain."""
    mesh = jax.sharding.Mesh(make_mesh(8).devices, ("d",))
    axes = ("d",)

    def body(x):
        big = collectives.any_device(x[0] > 6, axes)
        y = collectives.cond(
            big,
            lambda v: collectives.all_to_all(jnp.tile(v, (8, 1)), axes)[:, 0],
            lambda v: jnp.tile(v, 8),
            x,
        )
        return collectives.sum_over(y, axes)

    mapped = collectives.ordered_shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P())
    step = jax.jit(lambda x: mapped(None, x)[1])
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d")))
    hlo = _compiled(step, mesh, x)
    assert " conditional(" in hlo and collectives.unordered_collectives(hlo) == []
    # Device 7 holds 7 > 6: every device exchanges, and each receives all of x.
    np.testing.assert_array_equal(step(x), 8 * np.arange(8.0))
    np.testing.assert_array_equal(step(x * 0 + 1), np.full(8, 8.0))  # no device: no exchange


def test_collectives_refuse_to_run_unordered():
    mesh = jax.sharding.Mesh(make_mesh(8).devices, ("d",))
    raw = jax.shard_map(lambda x: collectives.sum_over(x, ("d",)), mesh=mesh, in_specs=P("d"), out_specs=P())
    with pytest.raises(RuntimeError, match="inside mesh.collectives.ordered_shard_map"):
        jax.jit(raw).lower(jax.device_put(jnp.ones(8), NamedSharding(mesh, P("d"))))


def test_the_parser_reads_tuple_results_and_branches():
    hlo = textwrap.dedent(
        """\
        %branch (p: f32[4]) -> f32[4] {
          %p = f32[4]{0} parameter(0)
          ROOT %a2a = f32[4]{0} all-to-all(%p), dimensions={0}
        }

        ENTRY %main (x: f32[4]) -> f32[4] {
          %x = f32[4]{0} parameter(0)
          %ar = (f32[4]{0}, /*index=1*/f32[4]{0}) all-reduce(%x, %x), to_apply=%add
          %g = f32[4]{0} get-tuple-element(%ar), index=0
          %c = f32[4]{0} conditional(%pred, %g, %g), branch_computations={%branch, %branch}
          %late = f32[4]{0} all-gather(%x), dimensions={0}
          ROOT %t = (f32[4]{0}, f32[4]{0}) tuple(%c, %late)
        }
        """
    )
    assert collectives.unordered_collectives(hlo) == [("c", "late")]


def test_overlap_reads_async_pairs_and_the_compute_between():
    """A scheduled accelerator program: TPU layouts hold parentheses, an async all-to-all
    has two fusions between its start and done, a branch's all-to-all stays synchronous."""
    hlo = textwrap.dedent(
        """\
        %branch (p: s32[8]) -> s32[8] {
          %p = s32[8]{0:T(128)} parameter(0)
          ROOT %ids = s32[8]{0:T(128)} all-to-all(%p), dimensions={0}, metadata={op_name="jit(f)/comm_ids/all_to_all"}
        }

        ENTRY %main (x: f32[8], i: s32[8], c: pred[]) -> f32[8] {
          %x = f32[8]{0:T(256)} parameter(0)
          %i = s32[8]{0:T(128)} parameter(1)
          %c = pred[]{:T(128)} parameter(2)
          %start = ((f32[8]{0:T(256)}), f32[8]{0:T(256)S(1)}, u32[]{:S(2)}) all-to-all-start(%x), dimensions={0}, metadata={op_name="jit(f)/comm_fwd/all_to_all"}
          %f1 = f32[8]{0:T(256)} fusion(%x), kind=kLoop, calls=%fused
          %b = f32[8]{0:T(256)} bitcast(%f1)
          %f2 = f32[8]{0:T(256)} fusion(%b), kind=kLoop, calls=%fused
          %done = f32[8]{0:T(256)S(1)} all-to-all-done(%start)
          %k = s32[8]{0:T(128)} conditional(%c, %i, %i), true_computation=%branch, false_computation=%branch
          ROOT %r = f32[8]{0:T(256)} add(%done, %f2)
        }
        """
    )
    records = sorted(overlap(hlo), key=lambda r: r["purpose"])
    assert [(r["purpose"], r["async"], r["overlapped"], r["in_branch"]) for r in records] == [
        ("fwd", True, 2, False),
        ("ids", False, 0, True),
    ]


# Stress: every strategy (one table each) and every route on both meshes, with batches
# that overflow the bucketized routes every other step. Each mesh's routes run in a
# process of their own, the two processes at once so that they contend for the two
# cores. The 2x4 mesh's bucketized routes hung in about half of the runs before the
# chain: they run three times as many steps (a hang is a race at run time, so more steps
# repeat it; another process would only repeat the compile). One bucketized route per
# mesh trains again with the sparse_dist pipeline, whose step also routes the next
# batch's ids: it must keep the chain and equal the plain run bit for bit; and with
# semi_sync, whose step looks the next batch up first: it must keep the chain.
ROUTES = ("auto", "broadcast", "rows", "pooled")
CASES = [("device=8", 8, "rows"), ("host=2,device=4", 24, "pooled")]


def _stress(case, timeout=400):
    mesh, steps, pipelined = case
    command = [sys.executable, "-m", "tests.collective_stress", "--mesh", mesh, "--routes", *ROUTES]
    command += ["--steps", str(steps), "--pipelined", pipelined]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        ran = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return case, None, f"no result after {time.monotonic() - started:.0f} s; finished: {ran.strip()}"
    if done.returncode != 0:
        return case, None, done.stderr[-2000:]
    return case, [json.loads(line) for line in done.stdout.strip().splitlines()], ""


@pytest.mark.slow
def test_no_step_hangs_under_contention():
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_stress, CASES))
    failed = {mesh: why for (mesh, *_), got, why in results if got is None}
    assert not failed, failed
    for (mesh, steps, pipelined), got, _ in results:
        assert [r["route"] for r in got] == list(ROUTES), (mesh, got)
        for r in got:
            assert r["unordered"] == [], (mesh, r)
            assert r["finite"] and r["steps"] == steps, (mesh, r)
            if r["route"] != "broadcast":  # the odd steps overflowed, the even ones did not
                assert r["fallbacks"] == steps // 2, (mesh, r)
            if r["route"] == pipelined:
                assert r["pipelined_unordered"] == [] and r["pipelined_equal"], (mesh, r)
                assert r["semi_sync_unordered"] == [] and r["semi_sync_finite"], (mesh, r)


def test_watchdog_names_the_step_that_stalls():
    class Stalled:  # a result that never becomes ready
        def block_until_ready(self):
            time.sleep(60)

    said = []
    with StepWatchdog(0.5, "strategy grid, mesh host=2,device=4", on_stall=said.append) as watchdog:
        watchdog.watch("step 0", jnp.ones(2))
        watchdog.watch("step 1", Stalled())
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
    assert said == [
        "step 1 did not finish within 0.5 s (strategy grid, mesh host=2,device=4): the devices stopped "
        "making progress; raise --step-timeout if a step can take this long"
    ]


def test_xla_timeouts_come_after_the_watchdog():
    flags = xla_collective_timeouts(100, "--xla_force_host_platform_device_count=8")
    assert "--xla_cpu_collective_call_warn_stuck_timeout_seconds=130" in flags
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=160" in flags
    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
    assert xla_collective_timeouts(100, mine).count("terminate_timeout") == 1
    assert xla_collective_timeouts(0, "") == ""


# A real stall: the step's loss goes through a collective that only device 0 joins.
_STALLING_RUN = """
import sys
import jax
from jax.sharding import PartitionSpec as P
from recsys import train
from recsys.training import ShardedTrainer

built = ShardedTrainer.__init__

def init(self, *args, **kwargs):
    built(self, *args, **kwargs)
    step, axes = self.train_step, self.axes
    def stall(x):
        return jax.lax.cond(jax.lax.axis_index(axes) == 0, lambda v: jax.lax.psum(v, axes), lambda v: v, x)
    stalled = jax.jit(jax.shard_map(stall, mesh=self.mesh, in_specs=P(axes), out_specs=P(axes), check_vma=False))
    def train_step(state, batch):
        state, loss = step(state, batch)
        return state, stalled(jax.numpy.broadcast_to(loss, (self.mesh.devices.size,)))[0]
    self.train_step = jax.jit(train_step)

ShardedTrainer.__init__ = init
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stalled_step_ends_the_cli_with_one_line():
    argv = ["--devices", "8", "--sharding", "grid", "--steps", "3", "--train-samples", "1024"]
    argv += ["--pipeline", "none"]  # the plain step is the one patched to stall
    argv += [
        "--eval-samples",
        "256",
        "--batch-size",
        "64",
        "--rows",
        "50",
        "--no-progress",
        "--step-timeout",
        "5",
    ]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _STALLING_RUN, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "recsys-train: error: step 0 did not finish within 5 s (strategy grid, route auto, mesh "
        "device=8): the devices stopped making progress; raise --step-timeout if a step can take this long"
    ], lines
    assert time.monotonic() - started < 60  # long before XLA would have aborted (65 s)
