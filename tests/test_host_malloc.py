"""recsys.host_malloc: importing recsys changes nothing; when `tune()` tunes glibc's malloc,
and that tuned, a step's large buffers come back without page faults."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys import host_malloc

ROOT = Path(__file__).resolve().parent.parent
GLIBC = host_malloc.is_glibc()


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"RECSYS_HOST_MALLOC": "off"}, "off: RECSYS_HOST_MALLOC=off"),
        ({"MALLOC_ARENA_MAX": "4"}, "off: the environment sets MALLOC_ARENA_MAX"),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "off: the environment sets GLIBC_TUNABLES"),
        ({"JAX_PLATFORMS": "tpu,cpu"}, "off: JAX_PLATFORMS=tpu,cpu computes off the CPU"),
    ],
)
def test_leaves_malloc_alone_when_asked_or_off_cpu(environ, expected):
    if not GLIBC:
        expected = "off: not glibc"
    assert host_malloc.tune(environ) == expected


def test_auto_leaves_malloc_alone_where_an_accelerator_plugin_is_installed(monkeypatch):
    monkeypatch.setattr(host_malloc, "_accelerator", lambda: "libtpu")
    expected = "off: libtpu is installed (JAX may compute on an accelerator)" if GLIBC else "off: not glibc"
    assert host_malloc.tune({}) == expected


def test_rejects_an_unknown_choice():
    with pytest.raises(ValueError, match="RECSYS_HOST_MALLOC must be one of auto, on, off, got 'yes'"):
        host_malloc.tune({"RECSYS_HOST_MALLOC": "yes"})


# Runs a program whose 64 MB temporary (the product, which the sine and the sum read) glibc
# would mmap afresh on every call, and prints the fewest page faults of four calls after
# the first, and recsys.host_malloc.state(). XLA frees the temporary on its own thread after
# the result is ready, so each call first waits a little for that free: under load the
# next call could otherwise allocate before it.
_FAULTS_PER_CALL = """
import resource, time
import jax, jax.numpy as jnp
import recsys
recsys.tune_host_malloc()
f = jax.jit(lambda a, b: jnp.sin(a @ b).sum())
a, b = jnp.ones((4096, 64), jnp.float32), jnp.ones((64, 4096), jnp.float32)
f(a, b).block_until_ready()
faults = []
for _ in range(4):
    time.sleep(0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults), recsys.host_malloc.state())
"""


def _faults_per_call(choice: str) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(RECSYS_HOST_MALLOC=choice, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CALL],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    faults, state = out.stdout.strip().split(" ", 1)
    return float(faults), state


@pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc's malloc")
def test_tuned_process_reuses_large_buffers_without_page_faults():
    faults_default, state_default = _faults_per_call("off")
    faults_tuned, state_tuned = _faults_per_call("on")
    assert state_default == "off: RECSYS_HOST_MALLOC=off"
    assert state_tuned == "tuned"
    # 64 MB is 16,384 pages of 4 KiB: untuned, every call touches them afresh.
    assert faults_default > 8000, faults_default
    assert faults_tuned < 500, faults_tuned


def test_importing_recsys_leaves_malloc_alone():
    code = "import recsys; from recsys import host_malloc; print(host_malloc.state())"
    env = {**os.environ, "RECSYS_HOST_MALLOC": "on"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "not tuned: recsys.tune_host_malloc() was not called"
