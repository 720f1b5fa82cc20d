"""The README's performance table is generated from a committed result file, never typed."""
from __future__ import annotations

import shutil
from pathlib import Path

from w4kern import report

REPO = Path(__file__).resolve().parent.parent


def test_readme_table_matches_its_result_file():
    text = (REPO / "README.md").read_text()
    found = report.readme_block(text)
    assert found is not None, "README.md lost its perf-table block"
    path, current, _, _ = found
    assert (REPO / path).is_file(), f"the README's table names {path}, which is not committed"
    assert current == report.table(REPO / path), (
        "README.md's performance table differs from its result file: run "
        f"python -m w4kern bench --from {path} --write-readme README.md")


def test_table_has_every_section_and_the_gpu():
    path, _, _, _ = report.readme_block((REPO / "README.md").read_text())
    table = report.table(REPO / path)
    assert table.startswith("NVIDIA ")
    for heading in ("| linear, INT4 g128 |", "| kernel | shape |", "| decode_attention Hq/Hkv/D |",
                    "| moe_align_block_size |"):
        assert heading in table


def test_write_readme_replaces_only_the_block(tmp_path):
    path, _, _, _ = report.readme_block((REPO / "README.md").read_text())
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(REPO / path, results / "run.json")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- perf-table:begin OLD -->\nstale\n<!-- perf-table:end -->\nafter\n")
    report.write_readme(readme, "results/run.json")
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- perf-table:begin results/run.json -->\n")
    assert text.endswith("<!-- perf-table:end -->\nafter\n")
    assert "stale" not in text and report.table(results / "run.json") in text


def test_cli_prints_the_table_without_a_gpu(capsys):
    from w4kern.__main__ import main

    path, _, _, _ = report.readme_block((REPO / "README.md").read_text())
    assert main(["bench", "--from", str(REPO / path), "--table"]) == 0
    assert capsys.readouterr().out == report.table(REPO / path)
    assert main(["bench", "--table"]) == 2      # needs --from


def test_source_tree_hash_follows_the_sources(tmp_path):
    from w4kern.bench import source_tree_hash

    for d in ("w4kern", "cuda_src"):
        (tmp_path / d).mkdir()
    (tmp_path / "w4kern" / "a.py").write_text("x = 1\n")
    (tmp_path / "cuda_src" / "k.cu").write_text("// k\n")
    (tmp_path / "w4kern" / "notes.txt").write_text("not a source")
    first = source_tree_hash(tmp_path)
    assert len(first) == 12 and first == source_tree_hash(tmp_path)
    (tmp_path / "w4kern" / "notes.txt").write_text("changed")
    assert source_tree_hash(tmp_path) == first
    (tmp_path / "cuda_src" / "k.cu").write_text("// k changed\n")
    assert source_tree_hash(tmp_path) != first
