"""The retrain flow, stopped right after a chosen checkpoint so that a kill test lands there.

    PF_STOP_AFTER=stage-3:2 PF_STOP_FILE=/tmp/x PYTHONPATH=.:tests/flows \
        python -c "import retrain_stop; retrain_stop.main()" configs/tiny.yaml KEY=VALUE ...

Runs `python -m flows.retrain` with tasks.train.job's checkpoint save wrapped: once stage NAME has
saved step N, the wrapper writes PF_STOP_FILE and waits forever, so the test that waits for the
file kills the run with that checkpoint complete and the stage unfinished, whatever the load.
"""
from __future__ import annotations

import os
import runpy
import time
from pathlib import Path


def install() -> None:
    from tasks.train import job as train

    stage, step = os.environ["PF_STOP_AFTER"].split(":")
    stop_file = os.environ["PF_STOP_FILE"]
    save = train.Worker._save  # an AttributeError here names the hook to update

    def save_then_stop(self, stage_dir, at_step, *args, **kwargs):
        save(self, stage_dir, at_step, *args, **kwargs)
        if stage_dir.name == stage and at_step == int(step):  # a tasks.train.checkpoints.Folder
            tmp = f"{stop_file}.tmp"
            Path(tmp).write_text(f"{stage}:{at_step}")
            os.replace(tmp, stop_file)
            while True:
                time.sleep(1)

    train.Worker._save = save_then_stop


def main() -> None:
    install()
    runpy.run_module("flows.retrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
