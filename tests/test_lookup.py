import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys.layout import build_layout
from recsys.lookup import init_tables, lookup, reference_lookup, stack_tables, unstack_tables
from tests.conftest import random_batch


def row_id_tables(config):
    """Tables whose every value encodes (table index, row): a misplaced row shows at once."""
    out = {}
    for t, spec in enumerate(config.tables):
        rows = np.arange(spec.rows, dtype=np.float32)[:, None]
        out[spec.name] = jnp.asarray(1000 * t + rows + np.zeros((1, spec.dim), np.float32))
    return out


def test_layout_stacks_tables_by_dim_and_optimizer(config):
    layout = build_layout(config)
    assert [(g.name, [t.name for t in g.tables], g.row_offsets) for g in layout.table_groups] == [
        ("dim4_0", ["a", "b"], (0, 50)),
        ("dim8_1", ["c"], (0,)),
    ]
    assert {lg.name for lg in layout.lookup_groups} == {
        "dim4_0/pooled3",
        "dim4_0/pooled2",
        "dim8_1/sequence4",
        "dim8_1/pooled40",
    }


def test_stack_unstack_round_trip(config):
    logical = row_id_tables(config)
    back = unstack_tables(config, stack_tables(config, logical))
    for name in logical:
        np.testing.assert_array_equal(back[name], logical[name])


def test_stacked_lookup_matches_reference_on_row_id_tables(config):
    logical = row_id_tables(config)
    batch = random_batch(config, 16)
    got = lookup(config, stack_tables(config, logical), batch)
    want = reference_lookup(config, logical, batch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_reference_semantics_on_a_hand_example(config):
    logical = row_id_tables(config)
    batch = random_batch(config, 4, seed=3)
    acts = reference_lookup(config, logical, batch)
    f = batch["a_mean"]
    for b in range(4):
        n = int(f.lengths[b])
        expected = float(np.mean(np.asarray(f.ids[b, :n]))) if n else 0.0
        np.testing.assert_allclose(acts["a_mean"][b], expected, rtol=1e-6)
    w = batch["b_weighted"]
    b_rows = np.asarray(w.ids[0, : int(w.lengths[0])]) + 1000
    np.testing.assert_allclose(
        acts["b_weighted"][0, 0], np.dot(b_rows, w.weights[0, : len(b_rows)]), rtol=1e-6
    )
    seq = acts["c_seq"]
    assert seq.shape == (4, 4, 8)
    for b in range(4):
        n = int(batch["c_seq"].lengths[b])
        np.testing.assert_array_equal(seq[b, n:], 0.0)


def test_lookup_of_random_tables_and_low_precision(config):
    tables = init_tables(config, jax.random.key(0))
    batch = random_batch(config, 8, seed=1)
    got = lookup(config, tables, batch)
    want = reference_lookup(config, unstack_tables(config, tables), batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in tables.items()}
    got16 = lookup(config, bf16, batch)
    want16 = reference_lookup(config, unstack_tables(config, bf16), batch)
    for name in want16:
        assert got16[name].dtype == jnp.float32  # accumulation in float32
        np.testing.assert_allclose(got16[name], want16[name], rtol=1e-5, atol=1e-6)


def test_activations_stacked_in_any_feature_order(config):
    logical = row_id_tables(config)
    batch = random_batch(config, 5)
    acts = lookup(config, stack_tables(config, logical), batch)
    want = reference_lookup(config, logical, batch)
    order = ["c_long", "a_sum", "b_weighted"]  # dims 8 and 4 cannot stack
    with pytest.raises(ValueError, match="different shapes"):
        acts.stacked(order)
    order = ["b_weighted", "a_sum", "a_mean"]  # spans two lookup groups, reordered
    np.testing.assert_array_equal(acts.stacked(order), np.stack([want[f] for f in order], axis=1))
    with pytest.raises(KeyError, match="nope"):
        acts.stacked(["nope"])
