"""The Pallas self-check of `kernels="auto"` on GPU and TPU, run here on a backend that
pretends to be a GPU: the kernels are interpreted, so they pass unless a test breaks them."""

import logging

import jax.numpy as jnp
import pytest

from recsys import kernel_check, kernels
from recsys.specs import SparseOptimizerSpec

ADAM = SparseOptimizerSpec(kind="adam", learning_rate=0.01)


@pytest.fixture
def on_gpu(monkeypatch):
    """Kernels chosen as on a GPU, with no checks run yet."""
    monkeypatch.setattr(kernel_check, "backend", lambda: "gpu")
    monkeypatch.setattr(kernel_check, "_RESULTS", {})


def test_kernels_that_pass_their_self_check_are_taken(on_gpu):
    assert kernels.table_path(jnp.float32, 16, "auto") == "pallas"
    assert kernels.rows_update_path(jnp.bfloat16, 8, ADAM, "auto") == "pallas"
    assert kernels.table_path(jnp.float32, 12, "auto") == "xla"  # Triton needs a power of two: no check
    checks = kernel_check.results()
    assert [(c["kernel"], c["dtype"], c["width"], c["passed"]) for c in checks] == [
        ("lookup", "float32", 16, True),
        ("lookup", "bfloat16", 8, True),
        ("update", "bfloat16", 8, True),
    ]
    assert checks[2]["optimizer"][0] == "adam" and checks[0]["backend"] == "gpu"


def test_a_kernel_that_fails_to_compile_falls_back_to_xla_with_one_warning(on_gpu, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Triton: could not lower\nsecond line")

    monkeypatch.setattr(kernel_check, "embedding_bag", broken)
    with caplog.at_level(logging.WARNING):
        assert kernels.table_path(jnp.float32, 16, "auto") == "xla"
        assert kernels.table_path(jnp.float32, 16, "auto") == "xla"  # checked once
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "the Pallas lookup for float32 tables 16 wide failed its self-check on gpu, using XLA" in message
    assert message.endswith("RuntimeError: Triton: could not lower")
    assert kernels.table_path(jnp.float32, 16, "pallas") == "pallas"  # asked for by name: no check


def test_an_update_that_disagrees_with_its_reference_falls_back_to_xla(on_gpu, monkeypatch, caplog):
    monkeypatch.setattr(kernel_check, "fused_update", lambda table, state, *a, **k: (table, state))
    with caplog.at_level(logging.WARNING):
        assert kernels.table_path(jnp.float32, 16, "auto") == "pallas"
        assert kernels.rows_update_path(jnp.float32, 16, ADAM, "auto") == "xla"
    (failed,) = [c for c in kernel_check.results() if not c["passed"]]
    assert failed["kernel"] == "update" and failed["reason"].startswith("updated table: differs")
    assert "(adam) failed its self-check" in caplog.records[0].getMessage()


def test_trainers_check_their_tables_when_built(on_gpu):
    import optax

    from recsys.cli import build, flags
    from recsys.synthetic import SyntheticConfig
    from recsys.training import Trainer

    config = SyntheticConfig(num_sparse=2, rows=50).embedding_config(16, SparseOptimizerSpec())
    model = build.build_model(flags.parse(["--num-tables", "2"]), config, 13)
    Trainer(model, optax.adam(1e-3))
    checks = {(c["kernel"], c["width"]): c["passed"] for c in kernel_check.results()}
    assert checks == {("lookup", 16): True, ("update", 16): True}


def test_a_check_first_asked_for_inside_a_traced_step_runs_beside_it(on_gpu):
    import jax

    paths = []

    @jax.jit
    def step(x):
        paths.append(kernels.table_path(jnp.float32, 32, "auto"))
        return x + 1

    assert int(step(jnp.int32(1))) == 2
    assert paths == ["pallas"] and kernel_check.results()[0]["passed"]
