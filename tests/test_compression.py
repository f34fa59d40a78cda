"""Compressed collectives: every codec's error bound, and narrow payloads in the HLO."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mesh import collectives
from mesh.collectives import CommConfig
from mesh.collectives.codecs import CODECS, Codec


def rows_of_every_kind(rng) -> np.ndarray:
    """[rows, 64] float32: ordinary, tiny, large, mixed-magnitude, constant, zero rows."""
    parts = [
        rng.normal(size=(8, 64)),
        rng.normal(size=(2, 64)) * 1e-7,  # float16 subnormals
        rng.normal(size=(2, 64)) * 3e4,
        rng.normal(size=(2, 64)) * np.logspace(-6, 2, 64),
        np.full((1, 64), -2.5),
        np.zeros((1, 64)),
        rng.uniform(0, 1, size=(2, 64)),  # one-signed rows (int8's bias)
    ]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("name", CODECS)
def test_decode_of_encode_is_within_the_documented_bound(name):
    c = Codec(name)
    x = jnp.asarray(rows_of_every_kind(np.random.default_rng(0)))
    payload = c.encode(x)
    expected_type = {"fp32": jnp.float32, "fp16": jnp.uint16, "bf16": jnp.uint16}.get(name, jnp.uint8)
    assert payload.dtype == expected_type and payload.shape == (
        x.shape[0],
        c.wire_width(64) // payload.itemsize,
    )
    error = np.abs(np.asarray(c.decode(payload)) - np.asarray(x))
    bound = np.asarray(c.error_bound(x))
    assert (error <= bound).all(), f"worst excess {np.max(error - bound)}"
    if c.compresses:  # the bound is not vacuous: some element comes within 4x of it
        ordinary = slice(0, 8)
        assert (error[ordinary] > bound[ordinary] / 4).any()
    if name != "fp32":
        assert not np.asarray(c.decode(c.encode(jnp.zeros((2, 8))))).any()


def test_scaled_codecs_keep_the_scale_with_the_payload():
    """fp8 and int8 carry their row's float32 scale (and bias) in the row's last bytes."""
    x = jnp.asarray([[1.0, -3.0, 0.5, 2.0]])
    for name, extra in (("fp8_e4m3", 4), ("fp8_e5m2", 4), ("int8", 8)):
        payload = Codec(name).encode(x)
        assert payload.shape == (1, 4 + extra)
        scale = np.frombuffer(np.asarray(payload[0, 4:8]).tobytes(), np.float32)[0]
        want = 5.0 / 255 if name == "int8" else 3.0 / {"fp8_e4m3": 448, "fp8_e5m2": 57344}[name]
        np.testing.assert_allclose(scale, want, rtol=1e-6)


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="codec must be one of fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8"):
        Codec("int4")


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("d",))


def _collective_types(hlo: str, op: str) -> set[str]:
    """Element types of every `op` result in an HLO dump (tuples included)."""
    types = set()
    for line in hlo.splitlines():
        if f" {op}(" in line or f" {op}-start(" in line:
            shapes = line.split("=", 1)[1].split(f" {op}")[0]
            types |= {dtype for dtype, _ in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes)}
    return types


def _ordered_jit(body, mesh, out_specs):
    """jit of `body` over the batch-sharded input, its collectives ordered."""
    mapped = collectives.ordered_shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=out_specs)
    return jax.jit(lambda x: mapped(None, x)[1])


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8_e4m3", "int8"])
def test_compressed_all_to_all_travels_narrow(name):
    mesh = _mesh()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8 * 8, 32)), jnp.float32)

    def body(x, compression):
        return collectives.all_to_all(x.reshape(8, 1, 32), ("d",), compression).reshape(8, 32)

    run = lambda c: _ordered_jit(functools.partial(body, compression=c), mesh, P("d"))
    got, plain = run(name)(x), run("fp32")(x)
    c = Codec(name)
    # The plain exchange of decode(encode(x)): rows are encoded independently (up to
    # float32 rounding of the decode, which XLA may fuse differently).
    want = run("fp32")(c.decode(c.encode(x)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (np.abs(np.asarray(got) - np.asarray(plain)) <= np.asarray(c.error_bound(plain))).all()
    hlo = run(name).lower(x).compile().as_text()
    assert _collective_types(hlo, "all-to-all") == {"u16" if name in ("bf16", "fp16") else "u8"}
    sent = collectives.collective_bytes(hlo, 8)["all-to-all"]
    assert sent == 7 * c.wire_width(32)  # 8 rows of 32, one stays home


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_compressed_sum_accumulates_in_float32(name):
    mesh = _mesh()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 1000)), jnp.float32)
    run = lambda f: _ordered_jit(f, mesh, P())
    compressed = run(lambda x: collectives.compressed_sum(x[0], ("d",), name, row=64))
    exact = run(lambda x: jax.lax.psum(x[0], ("d",)))
    got, want = np.asarray(compressed(x)), np.asarray(exact(x))
    c = Codec(name)

    def bound(flat):  # the codec's bound on rows of 64 values, as compressed_sum cuts them
        rows = np.pad(flat, (0, 1024 - flat.size)).reshape(-1, 64)
        return np.asarray(c.error_bound(jnp.asarray(rows))).reshape(-1)[: flat.size]

    # Each device's piece is rounded once on the way in, the float32 sum once on the way out.
    envelope = sum(bound(np.asarray(x[d])) for d in range(8)) + bound(got) * 1.01
    assert (np.abs(got - want) <= envelope).all()
    hlo = compressed.lower(x).compile().as_text()
    assert "all-reduce(" not in hlo.replace("all-reduce-start(", "")
    narrow = "u16" if name == "bf16" else "u8"
    assert _collective_types(hlo, "all-to-all") == {narrow} and _collective_types(hlo, "all-gather") == {
        narrow
    }
    sent = collectives.collective_bytes(hlo, 8)
    assert sent["all-to-all"] + sent["all-gather"] < 0.6 * 2 * 7 / 8 * 1000 * 4


# ---------------------------------------------------------------- sharded training


def _train(comm: str, steps: int = 8):
    """`steps` DLRM steps of tests/test_sharded_training.py's model on 8 devices (row-wise)
    with the given --comm: losses, logical tables, compiled bytes by purpose. Plain SGD for
    the dense part: unlike Adam it would show a mis-scaled gradient."""
    import optax

    from mesh import make_mesh, mesh_spec, plan_for_strategy
    from mesh.collectives import bytes_by_purpose
    from mesh.routing import RoutingOptions
    from recsys.training import ShardedTrainer
    from tests.test_sharded_training import CONFIG, batches, model

    mesh = make_mesh("device=8")
    plan = plan_for_strategy(CONFIG.tables, mesh_spec(mesh), "row_wise")
    routing = RoutingOptions("broadcast", comm=CommConfig.parse(comm))
    trainer = ShardedTrainer(model(), optax.sgd(0.05), plan, mesh, routing=routing)
    state, losses, step = trainer.init_state(), [], None
    for batch in list(batches())[:steps]:
        batch = trainer.shard_batch(batch)
        step = step or trainer.train_step.lower(state, batch).compile()  # one compile, its HLO read below
        state, loss = step(state, batch)
        losses.append(float(loss))
    sent = bytes_by_purpose(step.as_text(), 8)
    return np.asarray(losses), trainer.logical_tables(state), sent


def test_sharded_training_with_compressed_collectives_tracks_fp32():
    # The uncompressed sharded run equals one device (tests/test_sharded_training.py).
    one_losses, one_tables, fp32_sent = _train("")
    # One compressed run covering three codecs (each is checked alone above): CI time.
    runs = {"fwd=fp8_e4m3,bwd=bf16,allreduce=int8,ids=packed": 3e-2}
    for comm, tolerance in runs.items():
        got_losses, got_tables, sent = _train(comm)
        np.testing.assert_allclose(got_losses, one_losses, rtol=tolerance, err_msg=comm)
        for name in one_tables:
            np.testing.assert_allclose(got_tables[name], one_tables[name], atol=20 * tolerance, err_msg=name)
        config = CommConfig.parse(comm)
        for purpose in ("fwd", "bwd", "allreduce"):  # ids: below
            # Rows of this model's dim 8: a scaled codec's 4-8 bytes of scale weigh heavily
            # here (at dim 128 fp8 sends 0.26x, int8 0.27x; see benchmarks.sharded).
            width = 8 if purpose != "allreduce" else 70  # compressed_sum: 553 values in 8 rows
            ratio = Codec(getattr(config, purpose)).wire_width(width) / (4 * width)
            assert 0 < sent[purpose] <= 1.02 * ratio * fp32_sent[purpose], (comm, purpose, sent, fp32_sent)
        # Row shards of 7, 2 and 25 rows: one byte per id instead of four; the pooling
        # coefficients of the mean and weighted features keep their four.
        assert 0 < sent["ids"] < 0.65 * fp32_sent["ids"], (sent["ids"], fp32_sent["ids"])


def test_bfloat16_tables_keep_small_updates_on_average():
    """SGD steps far below half a bfloat16 step: rounding to nearest would drop them all;
    stochastic rounding keeps them on average (and a fixed seed repeats exactly)."""
    from recsys.sparse_update import round_rows

    values = jnp.full((4096, 8), 1.0, jnp.float32) - 1e-4  # a bfloat16 step at 1 is 2^-7
    rows = jnp.arange(4096)
    rounded = np.asarray(round_rows(values, rows, jnp.bfloat16, jnp.int32(5)), np.float32)
    assert set(np.unique(rounded)) == {1.0, 1.0 - 2**-8}  # the two neighbours below 1 and 1
    np.testing.assert_allclose(rounded.mean(), 1.0 - 1e-4, atol=2e-5)
    assert (np.asarray(values.astype(jnp.bfloat16), np.float32) == 1.0).all()  # nearest drops it
    again = np.asarray(round_rows(values, rows, jnp.bfloat16, jnp.int32(5)), np.float32)
    np.testing.assert_array_equal(again, rounded)


def test_bfloat16_tables_train_sharded_with_replicas_in_step():
    """Data-parallel bf16 tables and optimizer state round with the same bits on every
    device, so the replicas stay identical (shard_map would refuse a replicated output that
    differs)."""
    import dataclasses

    import optax

    from mesh import make_mesh, mesh_spec, plan_for_strategy
    from recsys.models import DLRM
    from recsys.training import ShardedTrainer
    from tests.test_sharded_training import CONFIG, batches

    narrow = lambda t: dataclasses.replace(  # noqa: E731
        t, dtype="bfloat16", optimizer=dataclasses.replace(t.optimizer, state_dtype="bfloat16")
    )
    config = dataclasses.replace(CONFIG, tables=tuple(map(narrow, CONFIG.tables)))
    mesh = make_mesh("device=8")
    plan = plan_for_strategy(config.tables, mesh_spec(mesh), "data_parallel")
    model = DLRM(config, dense_features=5, bottom=(16, 8), top=(16, 1), rngs=nnx.Rngs(0))
    trainer = ShardedTrainer(model, optax.sgd(0.05), plan, mesh)
    state = trainer.init_state()
    before = {k: np.asarray(v, np.float32) for k, v in trainer.logical_tables(state).items()}
    for batch in list(batches())[:2]:
        state, loss = trainer.train_step(state, trainer.shard_batch(batch))
    assert np.isfinite(float(loss))
    for name, table in trainer.logical_tables(state).items():
        assert table.dtype == jnp.bfloat16 and (np.asarray(table, np.float32) != before[name]).any()
    slots = [v for group in state.slots.values() for v in group.values()]
    assert slots and all(v.dtype == jnp.bfloat16 for v in slots)
    for storage in [*state.tables.values(), *slots]:  # every device holds the same replica
        shards = [np.asarray(s.data, np.float32) for s in storage.addressable_shards]
        assert all((s == shards[0]).all() for s in shards)


@pytest.mark.parametrize("bound", [1, 255, 256, 257, 65536, 65537, 1 << 24, (1 << 24) + 1])
def test_packed_ids_round_trip_in_the_fewest_bytes(bound):
    from mesh.collectives import packing

    width = packing.id_bytes(bound)
    assert width == next(w for w in (1, 2, 3, 4) if bound <= 1 << (8 * w))
    values = jnp.asarray(np.unique(np.r_[0, bound - 1, np.arange(0, bound, max(1, bound // 97))]), jnp.int32)
    packed = packing.pack(values[None], bound)
    assert packed.dtype == (jnp.int32 if width == 4 else jnp.uint8)
    assert packed.size * packed.dtype.itemsize == width * values.size
    np.testing.assert_array_equal(packing.unpack(packed, bound)[0], values)
    signed = jnp.asarray([-1, -(2**31), 2**31 - 1, 12345], jnp.int32)  # all four bytes: any int32
    np.testing.assert_array_equal(packing.from_bytes(packing.to_bytes(signed, 4), 4), signed)


def test_packed_ids_config_is_checked():
    assert CommConfig.parse("ids=packed").ids == "packed"
    with pytest.raises(ValueError, match="ids='fp16': the codec must be one of int32, packed"):
        CommConfig.parse("ids=fp16")
    with pytest.raises(ValueError, match="fwd='packed': the codec must be one of fp32"):
        CommConfig.parse("fwd=packed")
