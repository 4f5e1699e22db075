"""Evaluation experiments: resumable results stores, data parallelism, datasets by name, tables.

``xaijax eval EXPERIMENT ...`` on the command line; :func:`run_experiment` from Python.
"""

from xaijax.evaluation.datasets import DATASETS, open_dataset, resize_record
from xaijax.evaluation.parallel import DataParallel, make_mesh
from xaijax.evaluation.runner import EXPERIMENTS, EvalConfig, image_pairs, run_experiment
from xaijax.evaluation.store import ResultsStore, StoreMismatchError
from xaijax.evaluation.tables import atomic_text, markdown_table, write_tables

__all__ = [
    "DATASETS",
    "DataParallel",
    "EXPERIMENTS",
    "EvalConfig",
    "ResultsStore",
    "StoreMismatchError",
    "atomic_text",
    "image_pairs",
    "make_mesh",
    "markdown_table",
    "open_dataset",
    "resize_record",
    "run_experiment",
    "write_tables",
]
