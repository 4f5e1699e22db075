"""Evaluation experiments: resumable results stores, data parallelism, datasets by name, tables.

``xaijax eval EXPERIMENT ...`` on the command line; :func:`run_experiment` from Python.
"""

from xaijax.evaluation.datasets import DATASETS, open_dataset, resize_record
from xaijax.evaluation.parallel import DataParallel, make_mesh
from xaijax.evaluation.runner import EXPERIMENTS, EvalConfig, experiment_metrics, image_pairs, map_batches, pick_images, run_experiment
from xaijax.evaluation.store import ResultsStore, StoreMismatchError, merge_shards, read_store
from xaijax.evaluation.tables import markdown_table, write_tables

__all__ = [
    "DATASETS",
    "DataParallel",
    "EXPERIMENTS",
    "EvalConfig",
    "ResultsStore",
    "StoreMismatchError",
    "experiment_metrics",
    "image_pairs",
    "make_mesh",
    "map_batches",
    "markdown_table",
    "merge_shards",
    "open_dataset",
    "pick_images",
    "read_store",
    "resize_record",
    "run_experiment",
    "write_tables",
]
