"""The README's performance table is generated from benchmarks/results/, never typed by hand (issue 8): the table
between its markers is exactly what ``bench_train_step.py --readme-table`` renders from the committed rows."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_train_step import readme_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_performance_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- perf-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- perf-table:end -->")
    table = text[start:end].strip()
    assert table == readme_table().strip(), "regenerate it: python benchmarks/bench_train_step.py --readme-table"
    assert table.count("\n") >= 3  # a header, a rule and at least two measured rows
