"""Records live in :mod:`edgeslim.records` (below both the core and the benchmarks)."""

from edgeslim.records import CONFIG_KEYS, Record, load_records, save_records, weight_bits_label

__all__ = ["CONFIG_KEYS", "Record", "load_records", "save_records", "weight_bits_label"]
