"""Benchmark suites that write records (JSON), a Markdown report and PNG plots."""

from edgeslim.bench.records import Record, load_records, save_records
from edgeslim.bench.suites import SUITES, run_suite

__all__ = ["SUITES", "Record", "load_records", "run_suite", "save_records"]
