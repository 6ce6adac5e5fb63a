"""The house rules (docs/architecture.md) as import contracts, checked by import-linter.

    .venv/bin/lint-imports          # the same check, with its report

.importlinter lists the contracts: flows over tasks over model and storage, model/ and storage/
independent of each other and of the orchestration libraries, the GPU benchmarks on model/ only
(a GPU machine has torch and little else), and no import cycle among a package's modules
(imports inside functions count too).
"""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    report = run.stdout + run.stderr
    assert "Contracts:" in report, report  # the linter ran and read the contracts
    assert run.returncode == 0, report


def test_contracts_cover_every_package():
    """A new top-level package must be placed in the layers, not slip past the contracts."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    roots = config["importlinter"]["root_packages"].split()
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    assert packages == sorted(roots)
