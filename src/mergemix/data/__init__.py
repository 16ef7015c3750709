"""Datasets: a registry of sources, deterministic splits, and the on-disk prepared format."""

from mergemix.data.prepared import PreparedDataset, load_prepared, prepare_dataset  # noqa: F401
from mergemix.data.registry import SOURCES, get_source, register_source, source_names  # noqa: F401
