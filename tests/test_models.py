import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recsys.batching import Batch
from recsys.embedding import EmbeddingCollection
from recsys.lookup import lookup, stack_tables
from recsys.models import DLRM, DCNv2
from recsys.sparse import pack_batch
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
from recsys.training import Trainer
from tests.conftest import random_ragged

CONFIG = EmbeddingConfig(
    tables=tuple(TableSpec(name=f"t{i}", rows=40, dim=8) for i in range(3)),
    features=(
        FeatureSpec(name="f0", table="t0", max_ids=3),
        FeatureSpec(name="f1", table="t1", max_ids=2, pooling="mean"),
        FeatureSpec(name="f2", table="t2", max_ids=3),
        FeatureSpec(name="f0b", table="t0", max_ids=1),  # shares t0 with f0
    ),
)


def make_batch(seed, batch=16):
    rng = np.random.default_rng(seed)
    sparse = pack_batch(CONFIG, random_ragged(CONFIG, batch, rng))
    return Batch(
        dense=jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
        sparse=jax.tree.map(jnp.asarray, sparse),
        labels=jnp.asarray(rng.integers(0, 2, batch), jnp.float32),
    )


def make_model(kind, config=CONFIG, dense_dtype="float32"):
    common = dict(dense_features=5, bottom=(16, 8), top=(16, 1), rngs=nnx.Rngs(0), dense_dtype=dense_dtype)
    if kind == "dlrm":
        return DLRM(config, **common)
    return DCNv2(config, cross_rank=4, **common)


@pytest.mark.parametrize("kind", ["dlrm", "dcnv2"])
def test_bfloat16_dense_layers_are_mixed_precision(kind):
    """Every matmul of the forward and backward pass takes bf16 operands and gives float32;
    parameters and gradients stay float32, close to the float32 model's (8 significant
    bits per operand)."""
    batch = make_batch(0)
    wide, narrow = make_model(kind), make_model(kind, dense_dtype="bfloat16")
    np.testing.assert_allclose(narrow(batch.dense, batch.sparse), wide(batch.dense, batch.sparse), atol=3e-2)

    def grads(model):
        return nnx.grad(lambda m, d: jnp.sum(m(d, batch.sparse)))(model, batch.dense)

    text = nnx.jit(grads).lower(narrow).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    mixed = re.compile(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xf32>")
    assert len(dots) >= 6 and all(mixed.search(line) for line in dots), dots
    got, want = jax.tree.leaves(grads(narrow)), jax.tree.leaves(grads(wide))
    assert {x.dtype for x in got} == {jnp.dtype(jnp.float32)}
    # bf16 operands and cotangents through up to 6 layers, ReLUs flipping on the way: the
    # first layers' gradients differ most (5% for DLRM's first bias, in norm).
    for g, w in zip(got, want):
        assert np.linalg.norm(g - w) <= 0.08 * np.linalg.norm(w) + 1e-6
    with pytest.raises(ValueError, match="dense_dtype must be one of float32, bfloat16"):
        make_model(kind, dense_dtype="float16")


@pytest.mark.parametrize("kind", ["dlrm", "dcnv2"])
def test_model_lookup_path_equals_precomputed_activations(kind):
    model = make_model(kind)
    batch = make_batch(0)
    acts = lookup(CONFIG, model.embedding.stacked_tables(), batch.sparse)
    direct = model(batch.dense, batch.sparse)
    assert direct.shape == (16,)
    np.testing.assert_allclose(direct, model(batch.dense, acts), rtol=1e-6)


def test_model_config_errors():
    seq = EmbeddingConfig(
        tables=(TableSpec(name="t", rows=4, dim=8),),
        features=(FeatureSpec(name="s", table="t", pooling="none"),),
    )
    with pytest.raises(ValueError, match="needs pooled features"):
        DLRM(seq, dense_features=2, bottom=(8,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bottom MLP must end in the embedding dim 8"):
        DLRM(CONFIG, dense_features=2, bottom=(16, 4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["dlrm", "dcnv2"])
def test_split_train_step_matches_full_autodiff_with_sgd(kind):
    """One split step equals differentiating the whole model, tables included, with SGD."""
    sgd = SparseOptimizerSpec(kind="sgd", learning_rate=0.1)
    config = EmbeddingConfig(
        tables=tuple(dataclasses.replace(t, optimizer=sgd) for t in CONFIG.tables), features=CONFIG.features
    )
    model = make_model(kind, config)
    batch = make_batch(1)
    graphdef, params = nnx.split(model)
    trainer = Trainer(model, optax.sgd(0.1))
    state, loss = trainer.train_step(trainer.init_state(), batch)

    def full_loss(params):
        logits = nnx.merge(graphdef, params)(batch.dense, batch.sparse)
        return optax.sigmoid_binary_cross_entropy(logits, batch.labels).mean()

    want_loss, grads = jax.value_and_grad(full_loss)(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    _, got = nnx.split(trainer.model(state))
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    for (path, a), b in zip(got_leaves, jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_train_step_compiles_once_and_learns():
    trainer = Trainer(make_model("dlrm"), optax.adam(0.01))
    state = trainer.init_state()
    losses = [None] * 40
    for step in range(40):
        state, losses[step] = trainer.train_step(state, make_batch(step % 4))
    assert trainer.train_step._cache_size() == 1
    assert float(np.mean(losses[-4:])) < float(np.mean(losses[:4]))
    probs = trainer.predict(state, make_batch(0).dense, make_batch(0).sparse)
    assert probs.shape == (16,) and np.all((probs > 0) & (probs < 1))


def test_user_model_with_its_own_architecture():
    class TwoTower(nnx.Module):
        def __init__(self, rngs):
            self.embedding = EmbeddingCollection(CONFIG, rngs=rngs)
            self.dense = nnx.Linear(5, 8, rngs=rngs)

        def __call__(self, dense, sparse):
            acts = self.embedding(sparse)
            return jnp.sum(self.dense(dense) * (acts["f0"] + acts["f1"]), axis=1)

    trainer = Trainer(TwoTower(nnx.Rngs(0)), optax.sgd(0.1))
    state, loss = trainer.train_step(trainer.init_state(), make_batch(0))
    assert np.isfinite(float(loss))


def test_mixed_matmul_gradients_are_bf16_products():
    """The custom VJP's backward is exactly the two matmuls of the bf16-rounded cotangent
    and operands, accumulated in float32."""
    from recsys.models.mlp import mixed_matmul

    rng = np.random.default_rng(0)
    x, w, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 5, 16), (16, 8), (3, 5, 8)))
    out, vjp = jax.vjp(mixed_matmul, x, w)
    r = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)  # noqa: E731
    np.testing.assert_allclose(out, r(x) @ r(w), rtol=1e-5, atol=1e-5)
    dx, dw = vjp(g)
    np.testing.assert_allclose(dx, r(g) @ r(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, r(x).reshape(-1, 16).T @ r(g).reshape(-1, 8), rtol=1e-5, atol=1e-5)
    assert dx.dtype == dw.dtype == jnp.float32


def _pooled(embedding: EmbeddingCollection, batch) -> dict[str, np.ndarray]:
    """Each feature's pooled rows, looked up by hand from the collection's logical tables."""
    tables = {k: np.asarray(v) for k, v in embedding.logical_tables().items()}
    out = {}
    for f in CONFIG.features:
        bags = batch.sparse[f.name]
        ids, lengths = np.asarray(bags.ids), np.asarray(bags.lengths)
        rows = [tables[f.table][ids[i, : lengths[i]]] for i in range(len(lengths))]
        reduce = np.mean if f.pooling.value == "mean" else np.sum
        # An empty bag pools to zeros.
        out[f.name] = np.stack([reduce(r, axis=0) if len(r) else np.zeros(r.shape[1]) for r in rows])
    return out


def test_logistic_regression_and_the_factorization_machine_match_plain_formulas():
    from recsys.models.baselines import FactorizationMachine, LogisticRegression, baseline_tables

    batch = make_batch(1)
    dense = np.asarray(batch.dense)
    lr = LogisticRegression(baseline_tables("lr", CONFIG, 4), dense_features=5, rngs=nnx.Rngs(0))
    assert np.all(np.asarray(lr(batch.dense, batch.sparse)) == 0)  # every weight starts at 0
    lr.embedding.set_stacked_tables(
        stack_tables(
            lr.embedding.config,
            {
                t.name: jnp.arange(t.rows, dtype=jnp.float32)[:, None] / 100
                for t in lr.embedding.config.tables
            },
        )
    )
    lr.linear.dense.set_value(jnp.arange(5.0))
    lr.linear.bias.set_value(jnp.asarray(0.5))
    want = 0.5 + dense @ np.arange(5.0) + sum(p[:, 0] for p in _pooled(lr.embedding, batch).values())
    np.testing.assert_allclose(lr(batch.dense, batch.sparse), want, rtol=1e-5)

    fm = FactorizationMachine(baseline_tables("fm", CONFIG, 4), dense_features=5, rngs=nnx.Rngs(0))
    pooled = _pooled(fm.embedding, batch)
    v = np.asarray(fm.dense_factors.get_value())
    # Fields: each feature's pooled factors, and each dense column's value times its vector.
    fields = [p[:, 1:] for p in pooled.values()] + [dense[:, j : j + 1] * v[j] for j in range(5)]
    pairs = sum(
        np.sum(fields[a] * fields[b], axis=1) for a in range(len(fields)) for b in range(a + 1, len(fields))
    )
    want = sum(p[:, 0] for p in pooled.values()) + pairs  # bias and dense weights start at 0
    np.testing.assert_allclose(fm(batch.dense, batch.sparse), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fm: the tables hold a weight and the factors"):
        FactorizationMachine(baseline_tables("lr", CONFIG, 4), dense_features=5, rngs=nnx.Rngs(0))


def test_deepfm_and_wide_deep_add_an_mlp_over_the_field_vectors():
    from recsys.models.baselines import DeepFM, WideDeep, baseline_tables

    batch, config = make_batch(2), baseline_tables("deepfm", CONFIG, 4)
    dense = np.asarray(batch.dense)
    for kind in (DeepFM, WideDeep):
        model = kind(config, dense_features=5, top=(8, 1), rngs=nnx.Rngs(0))
        pooled = _pooled(model.fm.embedding if kind is DeepFM else model.embedding, batch)
        weights = sum(p[:, 0] for p in pooled.values())
        # The MLP sees the features' vectors side by side (in config order), then the dense columns.
        deep_in = np.concatenate([pooled[f.name][:, 1:] for f in CONFIG.features] + [dense], axis=1)
        deep = np.asarray(model.deep.mlp(jnp.asarray(deep_in)))[:, 0]
        if kind is DeepFM:
            want = np.asarray(model.fm(batch.dense, batch.sparse)) + deep
        else:
            want = weights + deep  # bias and dense weights start at 0
        np.testing.assert_allclose(
            model(batch.dense, batch.sparse), want, rtol=1e-4, atol=1e-5, err_msg=kind.__name__
        )
    with pytest.raises(ValueError, match="the deep MLP must end in 1 logit"):
        WideDeep(config, dense_features=5, top=(8, 2), rngs=nnx.Rngs(0))


def _relu_mlp(layers, x):
    """A plain NumPy pass through `recsys.models.mlp.MLP` layers (ReLU between them)."""
    for i, layer in enumerate(layers):
        x = x @ np.asarray(layer.kernel.get_value()) + np.asarray(layer.bias.get_value())
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def test_din_pools_histories_by_unnormalized_attention_against_the_other_features():
    from recsys.models.din import DIN

    config = dataclasses.replace(
        CONFIG,
        features=(*CONFIG.features[:2], FeatureSpec(name="history", table="t2", max_ids=5, pooling="none")),
    )
    rng = np.random.default_rng(3)
    sparse = jax.tree.map(jnp.asarray, pack_batch(config, random_ragged(config, 16, rng)))
    dense = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    model = DIN(config, dense_features=5, bottom=(16, 8), top=(16, 1), attention=(6,), rngs=nnx.Rngs(0))
    tables = {k: np.asarray(v) for k, v in model.embedding.logical_tables().items()}

    def pooled(name, reduce):
        bags = sparse[name]
        ids, lengths = np.asarray(bags.ids), np.asarray(bags.lengths)
        rows = [tables[config.feature(name).table][ids[i, : lengths[i]]] for i in range(16)]
        return np.stack([reduce(r, axis=0) if len(r) else np.zeros(8) for r in rows])

    bottom = np.maximum(_relu_mlp(model.bottom.layers, np.asarray(dense)), 0)  # relu_last
    context = np.concatenate([pooled("f0", np.sum), pooled("f1", np.mean), bottom], axis=1)
    q = context @ np.asarray(model.query.kernel.get_value()) + np.asarray(model.query.bias.get_value())
    interest = np.zeros((16, 8))
    bags = sparse["history"]
    for b in range(16):  # only the real positions: padding adds nothing
        for i in np.asarray(bags.ids)[b, : int(bags.lengths[b])]:
            k = tables["t2"][i]
            weight = _relu_mlp(model.attention[0].layers, np.concatenate([q[b], k, q[b] * k, q[b] - k]))
            interest[b] += weight[0] * k
    want = _relu_mlp(model.top.layers, np.concatenate([context, interest], axis=1))[:, 0]
    np.testing.assert_allclose(model(dense, sparse), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="give it a sequence feature"):
        DIN(CONFIG, dense_features=5, rngs=nnx.Rngs(0))


def test_factorization_machines_start_near_zero_however_many_fields():
    from recsys.models.baselines import FactorizationMachine, baseline_tables

    fields = 40
    config = EmbeddingConfig(
        tables=tuple(TableSpec(name=f"t{i}", rows=50, dim=8) for i in range(fields)),
        features=tuple(FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=1) for i in range(fields)),
    )
    rng = np.random.default_rng(0)
    sparse = jax.tree.map(jnp.asarray, pack_batch(config, random_ragged(config, 256, rng, min_len=1)))
    dense = jnp.asarray(np.abs(rng.normal(size=(256, 13))) * 3, jnp.float32)  # log-scaled counts
    model = FactorizationMachine(baseline_tables("fm", config, 16), dense_features=13, rngs=nnx.Rngs(0))
    assert float(jnp.std(model(dense, sparse))) < 0.5
