"""Reports made from benchmark records: Markdown tables and PNG plots (never typed numbers)."""

from edgeslim.report.markdown import records_table, write_report
from edgeslim.report.pareto import pareto_front

__all__ = ["pareto_front", "records_table", "write_report"]
