"""The run: prepare (checkpoints, data, trainer, resumed state), train, evaluate, report
the metrics. Every train and evaluation step is watched by the step watchdog."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable

import jax
import numpy as np

from mesh import mesh_spec
from mesh.collectives import bytes_by_purpose
from recsys import kernel_check, metrics
from recsys.batching import process_share, to_batch
from recsys.cache import CachedTrainer
from recsys.cli import errors
from recsys.cli.build import embedding_config, make_trainer, run_description, sparse_optimizer
from recsys.cli.config import ADDED_DEFAULTS, RunConfig
from recsys.cli.curves import Curves
from recsys.cli.data import LoadedData, load_data
from recsys.cli.errors import TrainingFailure, UsageError
from recsys.cli.profile import StepProfile
from recsys.cli.validation import Validator
from recsys.cli.watchdog import StepWatchdog
from recsys.data import (
    DataSchema,
    Dataset,
    Position,
    Prefetcher,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from recsys.progress import Progress
from recsys.sparse import InputPolicy, PackReport
from recsys.specs import EmbeddingConfig
from recsys.training import Checkpointer, CheckpointMismatch
from recsys.training.checkpoint import check_compatible
from recsys.training.pipeline import compiled_step, pipeline_of, train_steps
from recsys.training.sharded import to_host

# Bag widths come from the training data (or --max-ids); a longer bag, in evaluation data
# or under a smaller --max-ids, keeps its first max_ids ids and is counted in the report.
PACK_POLICY = InputPolicy(overlong="truncate")


@dataclasses.dataclass
class Run:
    """A prepared run: what it trains, and where it starts (step, data position, losses)."""

    config: RunConfig
    data: LoadedData
    tables: EmbeddingConfig
    trainer: object  # Trainer or ShardedTrainer (`recsys.training`'s protocol)
    steps: int
    checkpoints: Checkpointer | None
    state: object
    start_step: int = 0
    position: Position = Position()
    losses: list[np.float32] = dataclasses.field(default_factory=list)
    resumed: bool = False
    train_pack: PackReport = dataclasses.field(default_factory=PackReport)
    eval_pack: PackReport = dataclasses.field(default_factory=PackReport)
    validation_pack: PackReport = dataclasses.field(default_factory=PackReport)  # the latest validation's
    validator: Validator | None = None  # --eval-every / --early-stop
    trained_steps: int = 0  # where training ended: `steps`, or earlier when it stopped early

    def device_batch(self, examples, report: PackReport):
        """Packs this process's share of a host batch and places it on the devices."""
        return self.trainer.place_batch(to_batch(self.tables, process_share(examples), PACK_POLICY, report))


@dataclasses.dataclass
class Timing:
    compile_s: float | None = None
    samples_per_s: float | None = None
    # Bytes one device sends per step, by what they carry, read from the compiled step;
    # and what a step sends when bucketized routing overflows.
    comm_bytes: dict | None = None
    fallback_bytes: dict | None = None


def run(config: RunConfig) -> dict:
    """Trains and evaluates as `config` says; returns the metrics."""
    curves = Curves(config.log_dir)
    prepared = None
    try:
        with StepWatchdog(config.step_timeout, run_description(config)) as watchdog:
            prepared = prepare(config)
            timing = train(prepared, watchdog, curves)
            with failures_named(lambda: "evaluation"):
                if prepared.validator is not None:
                    prepared.state = prepared.validator.best_state(
                        prepared.trainer, prepared.state, prepared.trained_steps
                    )
                probs, labels = evaluate(prepared, watchdog)
        out = result(prepared, timing, probs, labels)
        curves.add(
            prepared.trained_steps, {f"eval/{k}": out[k] for k in ("auc", "logloss", "normalized_entropy")}
        )
        return out
    finally:
        curves.close()
        if prepared is not None and prepared.validator is not None:
            prepared.validator.close()


def prepare(config: RunConfig) -> Run:
    checkpoints, resumed = open_checkpoints(config)
    schema = DataSchema.from_json(resumed["schema"]) if resumed and resumed["schema"] else None
    data = load_data(config, sparse_optimizer(config), schema)
    steps = config.steps or config.epochs * steps_per_epoch(data.train, config.batch_size)
    if config.lr_schedule != "constant" and steps <= config.lr_warmup:
        raise UsageError(f"--lr-warmup {config.lr_warmup} leaves none of the {steps} steps to --lr-schedule")
    decays = config.dense_lr_schedule == "cosine" or config.lr_schedule != "constant"
    if resumed is not None and decays and resumed["total_steps"] != steps:
        raise CheckpointMismatch(
            f"the checkpoint in {config.checkpoint_dir} belongs to a run of {resumed['total_steps']} steps, "
            f"this one has {steps}; the learning-rate schedule's decay depends on the total"
        )
    tables = embedding_config(config, data, steps)
    trainer = make_trainer(config, tables, data, steps)
    prepared = Run(config, data, tables, trainer, steps, checkpoints, trainer.init_state())
    if config.validates:
        every = config.eval_every or steps_per_epoch(data.train, config.batch_size)
        prepared.validator = Validator(every, config.early_stop, config.checkpoint_dir, config.target_auc)
    if resumed is not None:
        resume(prepared, resumed)
    prepared.trained_steps = prepared.start_step
    return prepared


def open_checkpoints(config: RunConfig) -> tuple[Checkpointer | None, dict | None]:
    """The checkpointer and, when resuming, the latest checkpoint's metadata."""
    if config.checkpoint_dir is None:
        return None, None
    checkpoints = Checkpointer(config.checkpoint_dir, keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is None:
        return checkpoints, None
    if not config.resume:
        raise UsageError(
            f"{config.checkpoint_dir} already holds checkpoints (latest: step {latest}); "
            "pass --resume to continue from it, or choose another --checkpoint-dir"
        )
    metadata = checkpoints.read_metadata(latest)["metadata"]
    saved = {**ADDED_DEFAULTS, **metadata["run"]}
    check_compatible(saved, config.computed(), config.checkpoint_dir, "run configuration")
    return checkpoints, metadata


def resume(prepared: Run, metadata: dict) -> None:
    """Restores the latest checkpoint's state, data position and losses into `prepared`."""
    config, train_data = prepared.config, prepared.data.train
    if metadata["train_fingerprint"] != train_data.fingerprint:
        raise CheckpointMismatch(
            f"the checkpoint in {config.checkpoint_dir} was written while training on other data "
            f"(checkpoint: {metadata['train_fingerprint']}, now: {train_data.fingerprint})"
        )
    prepared.state, _ = prepared.checkpoints.restore(prepared.trainer, prepared.state)
    prepared.start_step = int(prepared.state.step)
    prepared.position = Position.from_json(metadata["position"])
    prepared.losses.extend(np.float32(x) for x in metadata["losses"])
    prepared.resumed = True
    if prepared.validator is not None:
        prepared.validator.resume(metadata["validation"], prepared.start_step)
    if prepared.start_step > prepared.steps:
        raise ValueError(
            f"the checkpoint is at step {prepared.start_step}, past the {prepared.steps} steps asked for"
        )


def save(prepared: Run, step: int, after: Position) -> None:
    config, data = prepared.config, prepared.data
    metadata = {
        "run": config.computed(),
        "total_steps": prepared.steps,
        "position": after.to_json(),
        "losses": [float(x) for x in prepared.losses],
        "schema": None if data.schema is None else data.schema.to_json(),
        "train_fingerprint": data.train.fingerprint,
        "validation": None if prepared.validator is None else prepared.validator.to_json(),
    }
    prepared.checkpoints.save(step, prepared.trainer, prepared.state, metadata)


@contextlib.contextmanager
def failures_named(where: Callable[[], str]):
    """Errors inside become `TrainingFailure`s that name `where()` (input errors, which
    name their file and line, and failures named by an inner block stay as they are)."""
    try:
        yield
    except Exception as e:
        if errors.is_input_error(e) or isinstance(e, TrainingFailure):  # named already
            raise
        raise TrainingFailure(where(), e) from e


def train(prepared: Run, watchdog: StepWatchdog, curves: Curves | None = None) -> Timing:
    """Runs the steps from `prepared.start_step` on, saving checkpoints as it goes."""
    config, steps = prepared.config, prepared.steps
    start = prepared.start_step
    timing = Timing()
    # Per-step losses: `pending` holds device scalars (reading one waits for its step), moved
    # to the host `losses` every 20 steps and at each save.
    pending: list[jax.Array] = []

    def flush() -> None:
        prepared.losses.extend(jax.device_get(pending))
        pending.clear()

    progress = Progress(steps, enabled=not config.no_progress and jax.process_index() == 0)
    validator = prepared.validator
    stopped = validator is not None and validator.stopped  # a resumed run that had stopped early
    batches = itertools.islice(
        train_batches(prepared.data.train, config.batch_size, seed=config.seed, start=prepared.position),
        0 if stopped else steps - start,
    )
    validating_s = 0.0 if validator is None else validator.seconds
    began, timed_from, step, after = time.perf_counter(), time.perf_counter(), start, prepared.position
    with (
        failures_named(lambda: f"step {step}"),
        Prefetcher(
            batches, lambda item: (prepared.device_batch(item[0], prepared.train_pack), item[1])
        ) as fed,
        StepProfile(config.profile, config.profile_dir, first=start) as profile,
    ):
        for step, (loss, (_, after)) in enumerate(_steps(prepared, fed, timing), start):
            watchdog.watch(f"step {step}", loss)
            pending.append(loss)
            if step == start:  # the first step includes compilation
                jax.block_until_ready(loss)
                timed_from = time.perf_counter()
                timing.compile_s = timed_from - began
            profile.after_step(step, loss)
            done = prepared.trained_steps = step + 1
            # Validation first: a checkpoint written after this step holds its evaluation.
            if (
                validator is not None
                and validator.due(done, steps)
                and validate(prepared, watchdog, curves, progress)
            ):
                break
            if prepared.checkpoints is not None and done % config.checkpoint_every == 0 and done < steps:
                flush()
                save(prepared, done, after)
            if done % 20 == 0 or done == steps:
                flush()
                rate = (step - start) * config.batch_size / max(time.perf_counter() - timed_from, 1e-9)
                recent = float(np.mean(prepared.losses[-20:]))
                progress.update(done, loss=recent, samples_per_s=rate)
                if curves is not None:
                    curves.add(
                        done, {"train/loss": recent, "train/samples_per_s": rate if step > start else None}
                    )
        jax.block_until_ready(prepared.state)
    elapsed = time.perf_counter() - timed_from
    if validator is not None:
        elapsed -= validator.seconds - validating_s
    flush()
    if prepared.checkpoints is not None:
        if prepared.trained_steps > start:
            save(prepared, prepared.trained_steps, after)
        prepared.checkpoints.close()
    # Steps after the compiling first one; a run with none has no timed rate (JSON null).
    timed_steps = prepared.trained_steps - start - 1
    timing.samples_per_s = timed_steps * config.batch_size / elapsed if timed_steps > 0 else None
    return timing


def validate(prepared: Run, watchdog: StepWatchdog, curves: Curves | None, progress: Progress) -> bool:
    """Evaluates the state after `prepared.trained_steps` steps on the validation split;
    returns whether training should stop."""
    validator, done = prepared.validator, prepared.trained_steps
    began = time.perf_counter()
    prepared.validation_pack = PackReport()
    with failures_named(lambda: f"validation after step {done}"):
        probs, labels = evaluate(
            prepared, watchdog, prepared.data.validation, prepared.validation_pack, name="validation"
        )
        stop = validator.record(done, probs, labels, prepared.trainer, prepared.state)
    validator.seconds += time.perf_counter() - began
    latest = validator.history[-1]
    if curves is not None:
        curves.add(done, {"validation/auc": latest["auc"], "validation/logloss": latest["logloss"]})
    progress.note(
        f"validation after step {done}: AUC {latest['auc']:.4f} log-loss {latest['logloss']:.4f} "
        f"(best: step {validator.best_step})"
    )
    if validator.reached_target is not None:
        progress.note(f"reached the target AUC {validator.target_auc} after step {done}")
    elif stop:
        progress.note(f"stopped early: {validator.patience} evaluations without a better validation log-loss")
    return stop


def _steps(prepared: Run, fed, timing: Timing):
    """(loss, item) of each step over the placed items (batch, data position after it), as
    the trainer's pipeline says; `prepared.state` holds the state after each."""
    trainer = prepared.trainer
    if isinstance(trainer, CachedTrainer):
        # A cached run sees the next batches' ids: it prefetches and chooses victims by them.
        for item, upcoming in trainer.lookahead(fed):
            prepared.state, loss = trainer.train_step(prepared.state, item[0], upcoming)
            yield loss, item
        return
    items = iter(fed)
    first = next(items, None)
    if first is None:
        return
    read_step_bytes(prepared, compiled_step(trainer, prepared.state, first[0]), timing)
    for state, loss, item in train_steps(trainer, prepared.state, itertools.chain([first], items)):
        prepared.state = state
        yield loss, item


def read_step_bytes(prepared: Run, compiled, timing: Timing) -> None:
    """The bytes one device sends per step, from the compiled step's HLO."""
    if not prepared.config.sharded:
        return
    hlo = compiled.as_text()
    devices = int(prepared.trainer.mesh.devices.size)
    timing.comm_bytes = bytes_by_purpose(hlo, devices)
    timing.fallback_bytes = bytes_by_purpose(hlo, devices, branch=1)


def evaluate(
    prepared: Run,
    watchdog: StepWatchdog | None = None,
    data: Dataset | None = None,
    report: PackReport | None = None,
    name: str = "evaluation",
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) for every example of `data` (default: the evaluation data),
    in order; batches prefetched."""
    probs, labels = [], []
    data = prepared.data.eval if data is None else data
    report = prepared.eval_pack if report is None else report

    def prepare_batch(item):
        examples, valid = item
        return prepared.device_batch(examples, report), examples.labels[:valid], valid

    with Prefetcher(eval_batches(data, prepared.config.batch_size), prepare_batch) as batches:
        for i, (batch, batch_labels, valid) in enumerate(batches):
            predicted = prepared.trainer.predict(prepared.state, batch.dense, batch.sparse)
            if watchdog is not None:
                watchdog.watch(f"{name} batch {i}", predicted)
            probs.append(np.asarray(to_host(predicted))[:valid])
            labels.append(batch_labels)
    return np.concatenate(probs), np.concatenate(labels)


def result(prepared: Run, timing: Timing, probs: np.ndarray, labels: np.ndarray) -> dict:
    """The run's metrics (`--metrics-out`)."""
    config, steps = prepared.config, prepared.steps
    losses = np.asarray(prepared.losses, np.float32)
    out = {
        "auc": metrics.auc(labels, probs),
        "logloss": metrics.logloss(labels, probs),
        "normalized_entropy": metrics.normalized_entropy(labels, probs),
        "train_loss": float(np.mean(losses[-max(1, steps // 10) :])),
        "steps": prepared.trained_steps,
        **_validation_result(prepared),
        "resumed_from_step": prepared.start_step if prepared.resumed else None,
        "samples_per_s": timing.samples_per_s,
        "compile_s": timing.compile_s,
        "train_examples": len(prepared.data.train),
        "eval_samples": len(labels),
        "data": config.data,
        "eval_data": config.eval_data,
        "model": config.model,
        "optimizer": config.optimizer,
        "dense_optimizer": config.dense_optimizer,
        "batch_size": config.batch_size,
        "embedding_dim": config.embedding_dim,
        "seed": config.seed,
        "backend": jax.default_backend(),
        "processes": jax.process_count(),
        "table_dtype": config.table_dtype,
        "state_dtype": config.state_dtype,
        "dense_dtype": config.dense_dtype,
        "pipeline": pipeline_of(prepared.trainer).value,
        "deterministic": config.deterministic,
        # The Pallas self-checks of --kernels auto on GPU and TPU, and what they decided.
        "kernel_checks": kernel_check.results(),
        "profile_dir": config.profile_dir
        if config.profile
        else None,  # what ran: one device routes no ids ahead
        **(_sharding_result(prepared, timing) if config.sharded else _one_device_result()),
        **_cache_result(prepared),
        "notes": prepared.data.notes + _pack_notes(prepared),
    }
    if out["routing_fallbacks"]:
        out["notes"].append(
            f"{out['routing_fallbacks']} of {steps - prepared.start_step} steps overflowed bucketized "
            "routing and took the broadcast route (correct, but slower): raise --route-capacity, or pass "
            "--route broadcast if ids are this skewed"
        )
    if prepared.data.planted_eval_logits is not None:
        planted = 1 / (1 + np.exp(-prepared.data.planted_eval_logits))
        out["planted_auc"] = metrics.auc(labels, planted)
        out["planted_logloss"] = metrics.logloss(labels, planted)
    return out


def _validation_result(prepared: Run) -> dict:
    """Where the final state came from (`steps`, or the best validation step) and the
    validation history."""
    validator = prepared.validator
    if validator is None:
        keys = ("validation_examples", "best_step", "stopped_early", "reached_target_at_step", "eval_history")
        return dict.fromkeys(keys)
    return {
        "validation_examples": len(prepared.data.validation),
        "best_step": validator.best_step,
        "stopped_early": validator.stopped,
        "reached_target_at_step": validator.reached_target,
        "eval_history": validator.history,
    }


def _sharding_result(prepared: Run, timing: Timing) -> dict:
    trainer, comm = prepared.trainer, timing.comm_bytes
    return {
        "devices": int(trainer.mesh.devices.size),
        "mesh": str(mesh_spec(trainer.mesh)),
        "plan": trainer.plan.to_json(),
        "routing_fallbacks": int(prepared.state.routing_fallbacks.addressable_data(0)),
        "comm": str(prepared.config.comm),
        "comm_bytes": comm,
        "comm_bytes_per_step": None if comm is None else sum(comm.values()),
        # What a step sends when bucketized routing overflows and it takes the broadcast
        # route (`routing_fallbacks` counts them); the same as above without such routes.
        "comm_bytes_fallback_per_step": None
        if timing.fallback_bytes is None
        else sum(timing.fallback_bytes.values()),
    }


def _one_device_result() -> dict:
    keys = ("mesh", "plan", "routing_fallbacks", "comm", "comm_bytes", "comm_bytes_per_step")
    return {"devices": 1, **dict.fromkeys(keys), "comm_bytes_fallback_per_step": None}


def _cache_result(prepared: Run) -> dict:
    """Hit rates, transfer bytes and each table's placement of a cached run."""
    trainer = prepared.trainer
    if not isinstance(trainer, CachedTrainer):
        return {"cache_hit_rate": None, "cache_placement": None}
    placement = {
        t.name: {"cached_rows": trainer.cached_rows(t.name), "rows": t.rows}
        if t.name in trainer.cached
        else {"device_rows": t.rows, "rows": t.rows}
        for t in trainer.config.tables
    }
    return {
        **trainer.cache_metrics(prepared.state),
        "cache_policy": trainer.cache.policy.value,
        "prefetch_depth": trainer.cache.prefetch_depth,
        "cache_placement": placement,
    }


def _pack_notes(prepared: Run) -> list[str]:
    reports = (
        ("train", prepared.train_pack),
        ("eval", prepared.eval_pack),
        ("validation", prepared.validation_pack),
    )
    return [f"{name}: {report.summary()}" for name, report in reports if report.total()]
