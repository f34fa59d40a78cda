"""The run's data: synthetic planted-model data, or real files through `recsys.data`."""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.cli.config import RunConfig
from recsys.data import ColumnOptions, DataSchema, Dataset, ReadOptions, open_data, open_eval
from recsys.specs import EmbeddingConfig, SparseOptimizerSpec
from recsys.synthetic import PlantedModel, SyntheticConfig


@dataclasses.dataclass
class LoadedData:
    config: EmbeddingConfig
    num_dense: int
    train: Dataset
    eval: Dataset
    schema: DataSchema | None  # None for synthetic data
    planted_eval_logits: np.ndarray | None  # synthetic data only
    notes: list[str]
    validation: Dataset | None = None  # the last part of the training data (--validation)


def read_options(config: RunConfig) -> ReadOptions:
    columns = ColumnOptions(
        encoding=config.encoding,  # None: the format's default
        rows=config.rows,
        max_ids=config.max_ids,
        min_count=config.min_count,
        max_rows=config.max_rows or ColumnOptions().max_rows,
        sequence=config.sequence,
    )
    return ReadOptions(
        label=config.label,
        dense=config.dense,
        sparse=config.sparse,
        ignore=config.ignore,
        multi_hot_sep=config.multi_hot_sep,
        delimiter=config.delimiter,
        libfm_fields=config.libfm_fields,
        columns=columns,
        on_error=config.on_error,
        holdout=config.holdout,
        validation=config.validation_fraction,
    )


def load_data(config: RunConfig, sparse_opt: SparseOptimizerSpec, schema: DataSchema | None) -> LoadedData:
    """The run's train and eval data and the embedding config they imply (`schema`: the
    one a resumed run's checkpoint recorded, so ids encode as before)."""
    if config.data == "synthetic":
        return _synthetic(config, sparse_opt)
    options = read_options(config)
    opened = open_data(config.data, config.eval_data, options, schema=schema)
    validation, validation_report = opened.validation, None
    if config.validation_data is not None:
        validation, validation_report = open_eval(
            config.validation_data, opened.schema, options, what="validation"
        )
    notes = []
    reports = (("training", opened.train_report), ("evaluation", opened.eval_report))
    for name, report in (*reports, ("validation", validation_report)):
        if report is not None and report.total():
            notes.append(f"{name} data: {report.summary()}")
    return LoadedData(
        config=opened.schema.embedding_config(config.embedding_dim, sparse_opt),
        num_dense=len(opened.schema.dense),
        train=opened.train,
        eval=opened.eval,
        schema=opened.schema,
        planted_eval_logits=None,
        notes=notes,
        validation=validation,
    )


def _synthetic(config: RunConfig, sparse_opt: SparseOptimizerSpec) -> LoadedData:
    synthetic = SyntheticConfig(
        num_sparse=config.num_tables, rows=config.rows or 1000, max_ids=config.max_ids or 4
    )
    planted = PlantedModel(synthetic, seed=config.seed)
    train_examples = planted.generate(config.train_samples, seed=config.seed).examples()
    eval_data = planted.generate(config.eval_samples, seed=config.seed + 10_000)
    # Validation: the training samples' last fraction, as for files.
    start = len(train_examples) - int(round(len(train_examples) * config.validation_fraction))
    if start == 0:
        raise ValueError(
            f"--train-samples {config.train_samples} leaves no training samples beside validation"
        )
    validation = None
    if start < len(train_examples):
        held = train_examples.slice(start, len(train_examples))
        validation = Dataset.in_memory(held, name=f"synthetic-validation-{config.seed}")
    return LoadedData(
        config=synthetic.embedding_config(config.embedding_dim, sparse_opt),
        num_dense=synthetic.num_dense,
        train=Dataset.in_memory(train_examples.slice(0, start), name=f"synthetic-train-{config.seed}"),
        eval=Dataset.in_memory(eval_data.examples(), name=f"synthetic-eval-{config.seed}"),
        schema=None,
        planted_eval_logits=eval_data.true_logits,
        notes=[],
        validation=validation,
    )
