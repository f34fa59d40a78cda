import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys.sparse import InputPolicy, PackReport, RaggedIds, pack_batch, pack_feature
from recsys.specs import FeatureSpec
from tests.conftest import random_ragged


def test_pack_feature_pads_and_keeps_order():
    spec = FeatureSpec(name="f", table="t", max_ids=3)
    packed = pack_feature(spec, 10, RaggedIds.from_lists([[1, 2], [], [3, 4, 5]]))
    np.testing.assert_array_equal(packed.ids, [[1, 2, 0], [0, 0, 0], [3, 4, 5]])
    np.testing.assert_array_equal(packed.lengths, [2, 0, 3])
    np.testing.assert_array_equal(packed.valid_mask(), [[1, 1, 0], [0, 0, 0], [1, 1, 1]])


def test_out_of_range_is_an_error_naming_the_feature_and_sample():
    spec = FeatureSpec(name="clicks", table="t", max_ids=2)
    with pytest.raises(ValueError, match=r"feature 'clicks': id 10 in sample 1 is outside \[0, 10\)"):
        pack_feature(spec, 10, RaggedIds.from_lists([[1], [10]]))
    with pytest.raises(ValueError, match="id -1 in sample 0"):
        pack_feature(spec, 10, RaggedIds.from_lists([[-1], [3]]))


def test_overlong_bag_is_an_error_naming_the_feature():
    spec = FeatureSpec(name="hist", table="t", max_ids=2)
    with pytest.raises(ValueError, match="feature 'hist': sample 1 has 3 ids but max_ids is 2"):
        pack_feature(spec, 10, RaggedIds.from_lists([[1], [1, 2, 3]]))


def test_opt_in_policies_rewrite_and_report_counts():
    spec = FeatureSpec(name="f", table="t", max_ids=2)
    report = PackReport()
    policy = InputPolicy(out_of_range="modulo", overlong="truncate")
    packed = pack_feature(spec, 10, RaggedIds.from_lists([[12, -3], [1, 2, 3, 4]]), policy, report)
    np.testing.assert_array_equal(packed.ids, [[2, 7], [1, 2]])
    assert report.remapped_ids == {"f": 2}
    assert report.truncated_ids == {"f": 2} and report.truncated_bags == {"f": 1}
    assert "2 ids remapped" in report.summary() and "2 ids dropped" in report.summary()

    hashed = pack_feature(spec, 10, RaggedIds.from_lists([[10**12, 5]]), InputPolicy(out_of_range="hash"))
    assert 0 <= hashed.ids[0, 0] < 10 and hashed.ids[0, 1] == 5


def test_weights_are_required_exactly_for_weighted_features():
    weighted = FeatureSpec(name="w", table="t", max_ids=2, weighted=True)
    with pytest.raises(ValueError, match="needs per-id weights"):
        pack_feature(weighted, 10, RaggedIds.from_lists([[1]]))
    with pytest.raises(ValueError, match="non-finite weight in sample 1"):
        pack_feature(weighted, 10, RaggedIds.from_lists([[1], [2]], [[0.5], [np.nan]]))
    packed = pack_feature(weighted, 10, RaggedIds.from_lists([[1, 2]], [[0.5, 2.0]]))
    np.testing.assert_array_equal(packed.weights, [[0.5, 2.0]])


def test_pack_batch_checks_feature_names(config):
    with pytest.raises(ValueError, match="missing features"):
        pack_batch(config, {})


def test_varying_bag_lengths_do_not_recompile(config):
    traces = []

    @jax.jit
    def total(batch):
        traces.append(1)
        return sum(jnp.sum(f.ids * f.valid_mask()) for f in batch.features.values())

    rng = np.random.default_rng(0)
    for min_len in (0, 1, 2, 0, 3):
        batch = pack_batch(config, random_ragged(config, 16, rng, min_len=min(min_len, 2)))
        total(jax.tree.map(jnp.asarray, batch))
    assert len(traces) == 1
