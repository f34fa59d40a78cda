import pytest

from recsys.specs import (
    EmbeddingConfig,
    FeatureSpec,
    InitializerSpec,
    Pooling,
    SparseOptimizerSpec,
    TableSpec,
)


def test_specs_are_frozen_hashable_and_normalized():
    table = TableSpec(name="t", rows=10, dim=4, dtype="bfloat16")
    feature = FeatureSpec(name="f", table="t", pooling="mean")
    assert feature.pooling is Pooling.MEAN
    assert hash(EmbeddingConfig(tables=[table], features=[feature]))
    with pytest.raises(AttributeError):
        table.rows = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TableSpec(name="t", rows=0, dim=4), "rows must be a positive int"),
        (lambda: TableSpec(name="t", rows=10, dim=-1), "dim must be a positive int"),
        (lambda: TableSpec(name="", rows=10, dim=4), "table name"),
        (lambda: TableSpec(name="t", rows=10, dim=4, dtype="int8"), "dtype"),
        (lambda: TableSpec(name="t", rows=2**31, dim=4), "int32"),
        (lambda: FeatureSpec(name="f", table="t", pooling="max"), "pooling"),
        (lambda: FeatureSpec(name="f", table="t", max_ids=0), "max_ids"),
        (lambda: SparseOptimizerSpec(kind="lamb"), "optimizer kind"),
        (lambda: SparseOptimizerSpec(learning_rate=-1.0), "learning_rate"),
        (lambda: SparseOptimizerSpec(beta1=1.0), "beta1"),
        (lambda: InitializerSpec(kind="normal", scale=0.0), "scale"),
    ],
)
def test_bad_specs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_cross_checks():
    table = TableSpec(name="t", rows=10, dim=4)
    with pytest.raises(ValueError, match="unknown table 'u'"):
        EmbeddingConfig(tables=[table], features=[FeatureSpec(name="f", table="u")])
    with pytest.raises(ValueError, match="appears more than once"):
        EmbeddingConfig(tables=[table, table], features=[FeatureSpec(name="f", table="t")])
    with pytest.raises(ValueError, match="read by no feature"):
        EmbeddingConfig(
            tables=[table, TableSpec(name="v", rows=3, dim=4)], features=[FeatureSpec(name="f", table="t")]
        )
