"""compare.py: what eval.py --compare and benchmarks.py --compare share."""
import json

import pytest

import compare
from utils import ModelLoadError


def test_examples_spread_over_the_file():
    assert compare.spread_indices(200, 4) == [0, 50, 100, 150]
    assert compare.spread_indices(10, 4) == [0, 2, 5, 7]
    assert compare.spread_indices(5, 0) == [0, 1, 2, 3, 4]  # 0: all
    assert compare.spread_indices(3, 10) == [0, 1, 2]  # more asked than there are: all, once


def test_compare_items_with_and_without_options():
    assert compare.parse_compare(["a=m", "b=x/y"]) == [compare.Compared("a", "m"), compare.Compared("b", "x/y")]
    assert compare.parse_compare(["a=m@k,o"], options=("k", "o")) == [compare.Compared("a", "m", ("k", "o"))]
    assert compare.parse_compare(["a=m@k"]) == [compare.Compared("a", "m@k")]  # no options: '@' is part of the path
    for bad, options in (("=m", ()), ("a=", ()), ("a", ()), ("a=m@z", ("k",))):
        with pytest.raises(ModelLoadError, match="^--compare .*expected NAME=PATH"):
            compare.parse_compare([bad], options=options)
    with pytest.raises(ModelLoadError, match="distinct"):
        compare.parse_compare(["a=m", "a=n"])


def test_a_finished_run_is_reused_only_whole_and_with_the_same_settings(tmp_path):
    saved, rows = tmp_path / "metrics.json", tmp_path / "rows.jsonl"
    saved.write_text(json.dumps({"n": 3}))
    assert compare.read_finished(saved, rows) is None  # its rows are missing: done again
    rows.write_text("{}\n")
    assert compare.read_finished(saved, rows) == {"n": 3}
    assert compare.read_finished(saved, rows, same_settings=lambda s: s["n"] == 4) is None


def test_the_comparison_json_and_its_section_are_written_and_the_rest_of_the_file_kept(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nHand-written.\n")
    for section in ("first", "second"):
        compare.write_comparison(tmp_path / "runs", {"a": {"acc": 1}}, md, section, "<!-- b -->", "<!-- e -->", "## T")
    text = md.read_text()
    assert "Hand-written." in text and "second" in text and "first" not in text and text.count("## T") == 1
    assert json.loads((tmp_path / "runs" / "comparison.json").read_text()) == {"a": {"acc": 1}}
