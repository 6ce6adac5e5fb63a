"""The panelforge command line: --help everywhere, datasets show, clear errors (exit status 2)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from flows.cli import FLOWS, main
from storage import DatasetWriter

ROOT = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).with_name("panelforge"))]


def test_console_script_help():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, check=True).stdout
    for command in [*FLOWS, "demo", "datasets", "config"]:
        assert command in out


@pytest.mark.parametrize("argv", [[c, "--help"] for c in FLOWS] + [["demo", "--help"], ["datasets", "show", "--help"], ["config", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: panelforge" in capsys.readouterr().out


def test_datasets_show(tmp_path, capsys):
    src = DatasetWriter(tmp_path / "panels", "panels")
    src.finalize()
    w = DatasetWriter(tmp_path / "tokens", "tokens", inputs=[src.manifest], meta={"layout_fingerprint": "abc123"})
    table = pa.table({
        "id": ["a", "b", "c"], "task": ["t2i", "edit", "t2i"], "bucket": ["64x64"] * 3,
        "grid_h": [8] * 3, "grid_w": [8] * 3, "tokens": [[1, 2]] * 3, "loss_start": [1] * 3,
    })
    w.write_unit("00000", table, rejects=[
        {"input_ref": "x.png", "stage": "tokenize", "reason": "prompt-too-long"},
        {"input_ref": "y.png", "stage": "tokenize", "reason": "prompt-too-long"},
    ])
    w.finalize()
    assert main(["datasets", "show", str(tmp_path / "tokens"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "kind      tokens (complete)" in out and "rows      3" in out and "shards    1" in out
    assert "t2i" in out and "edit" in out and "prompt-too-long" in out
    assert "layout_fingerprint=abc123" in out and "verified  2 files" in out
    assert f"<- panels {tmp_path / 'panels'}" in out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["datasets", "show", str(tmp_path / "none")]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["datasets", "show", "gs://bucket/x"]) == 2
    assert "unsupported URI scheme" in capsys.readouterr().err
    assert main(["build-panels", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["config", "--config", str(ROOT / "configs/tiny.yaml"), "ray.num_cpus=many"]) == 2
    assert "ray.num_cpus" in capsys.readouterr().err


def test_config_show(capsys):
    assert main(["config", "--config", str(ROOT / "configs/tiny.yaml"), "workdir=/tmp/x"]) == 0
    assert '"workdir": "/tmp/x"' in capsys.readouterr().out


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `panelforge ... | head`: the reader closes the pipe while the command still writes. The
    # output is larger than a pipe's buffer, so the writer is still writing when the pipe closes.
    code = ("import sys; from tasks import quiet_broken_pipe\n"
            "def chatty():\n"
            "    for i in range(200_000):\n"
            "        print('line', i)\n"
            "    return 0\n"
            "sys.exit(quiet_broken_pipe(chatty))\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141, err
    assert err == ""  # no traceback, and no second error from the interpreter's flush at exit


def test_a_broken_pipe_that_is_not_stdout_is_the_commands_error():
    # A socket or child process breaking under a flow must not pass for `| head`: with stdout read
    # to the end, the error is raised as it was (traceback, status 1), not swallowed as status 141.
    code = ("import sys; from tasks import quiet_broken_pipe\n"
            "def breaks():\n"
            "    print('working')\n"
            "    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n"
            "sys.exit(quiet_broken_pipe(breaks))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stdout == "working\n"
    assert "BrokenPipeError" in p.stderr and "a socket" in p.stderr
