"""mergemix: select fine-tuning dataset mixtures by model merging (Merge to Mix)."""

__version__ = "0.1.0"
