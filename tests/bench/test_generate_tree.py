"""bench.generate acceptance with draft trees: the run plan, and the figure other benches read.

    .venv/bin/python -m pytest -q tests/bench/test_generate_tree.py
"""
import json

import pytest

from bench.generate import carry_tau, measured_acceptance, tree_plan
from model.sjd import CARRY_TAU, parse_tree


def test_tree_plan_adds_the_equal_node_runs_that_fit():
    trees = [(0, 0), (2, 3), (6, 2)]
    plan = tree_plan([8, 16], trees, equal_nodes=True)
    assert plan[:6] == [(8, (0, 0)), (8, (2, 3)), (8, (6, 2)), (16, (0, 0)), (16, (2, 3)), (16, (6, 2))]
    # 16 nodes: window 10 + 2x3 and window 4 + 6x2; 8 nodes: neither fits (window 2 holds no 3-node branch)
    assert plan[6:] == [(10, (2, 3)), (4, (6, 2))]
    assert tree_plan([16], trees, equal_nodes=False) == [(16, t) for t in trees]


def test_the_measured_figure_is_never_a_tree_run(tmp_path):
    """The per-image and bulk figures read the plain window's row, whatever order the runs are in."""
    row = {"sjd": True, "group": "t2i", "window": 16, "drafts": "pac"}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"default_draft": "pac", "runs": [dict(row, tree="3x2", tokens_per_step=2.24),
                                                                dict(row, tree="0x0", tokens_per_step=2.09)]}))
    assert measured_acceptance(16, path=path) == 2.09
    path.write_text(json.dumps({"default_draft": "pac", "runs": [dict(row, tokens_per_step=2.09)]}))  # older files
    assert measured_acceptance(16, path=path) == 2.09


def test_parse_tree_says_what_it_expects():
    assert parse_tree("3x2") == (3, 2) and parse_tree([2, 3]) == (2, 3) and parse_tree("0x0") == (0, 0)
    for bad in ("3", "ax2", "3x2x1", None):
        with pytest.raises(ValueError, match="expected SIBLINGSxBRANCH"):
            parse_tree(bad)


def test_a_tree_figure_is_the_engines_carry_over(tmp_path):
    """With runs of both carry-overs (--carry-tau none 0.05) a tree's figure is the one the engine
    runs by default (sjd.CARRY_TAU); files from before carry_tau (the plain mean) still serve."""
    row = {"sjd": True, "group": "t2i", "window": 16, "drafts": "pac", "tree": "3x2"}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"default_draft": "pac", "runs": [dict(row, carry_tau=None, tokens_per_step=2.31),
                                                                dict(row, carry_tau=CARRY_TAU, tokens_per_step=2.36)]}))
    assert measured_acceptance(16, path=path, tree="3x2") == 2.36
    path.write_text(json.dumps({"default_draft": "pac", "runs": [dict(row, tokens_per_step=2.34)]}))
    assert measured_acceptance(16, path=path, tree="3x2") == 2.34
    assert carry_tau("none") is None and carry_tau("None") is None and carry_tau("0.05") == 0.05


def test_the_measured_figure_is_the_configs_min_p(tmp_path):
    """`acceptance --min-p 0 0.3` runs each value side by side; the figure other benches read is
    the run at the config's min-p (the file's "min_p"), and files before min-p (no such keys) are 0."""
    row = {"sjd": True, "group": "t2i", "window": 16, "drafts": "pac", "tree": "0x0"}
    path = tmp_path / "acc.json"
    runs = [dict(row, min_p=0.0, tokens_per_step=2.54), dict(row, min_p=0.3, tokens_per_step=3.10)]
    path.write_text(json.dumps({"default_draft": "pac", "min_p": 0.3, "runs": runs}))
    assert measured_acceptance(16, path=path) == 3.10
    path.write_text(json.dumps({"default_draft": "pac", "min_p": 0.0, "runs": runs[::-1]}))
    assert measured_acceptance(16, path=path) == 2.54
    path.write_text(json.dumps({"default_draft": "pac", "runs": [dict(row, tokens_per_step=2.33)]}))
    assert measured_acceptance(16, path=path) == 2.33
    path.write_text(json.dumps({"default_draft": "pac", "min_p": 0.1, "runs": runs}))
    with pytest.raises(LookupError, match="no t2i run at window 16 with pac drafts and tree 0x0 at min-p 0.1"):
        measured_acceptance(16, path=path)
