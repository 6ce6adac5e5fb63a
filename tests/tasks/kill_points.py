"""A generate job whose workers stop where a kill test wants them, so that the kill lands there.

    PYTHONPATH=.:tests/tasks python -m kill_points --config CFG    # what the kill tests run

The job is tasks.generate.job's, with GenerateWorker replaced by StoppingWorker, which reads two
variables from its process's environment (a Ray worker inherits its raylet's, so a test can set
them for one node of a cluster only):

- PF_STOP_AT_UNIT=N: when its Nth unit begins, the worker writes PF_STOP_FILE (the unit's
  name) and waits forever: the job cannot finish, so a test that waits for the file kills it
  at a known point, with a known set of committed units.
- PF_HOLD_AT_UNIT=N: when its Nth unit begins, the worker waits until PF_STOP_FILE exists (so
  another worker is stopped) and then goes on: that worker cannot take all the units first.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from tasks.generate.job import GenerateWorker

HOLD_LIMIT_S = 600  # a held worker goes on anyway after this: the test fails on its own deadline first


class StoppingWorker(GenerateWorker):
    def __call__(self, unit: dict) -> dict:
        self.units_begun = getattr(self, "units_begun", 0) + 1
        stop_file = os.environ.get("PF_STOP_FILE")
        if stop_file and os.environ.get("PF_STOP_AT_UNIT") == str(self.units_begun):
            tmp = f"{stop_file}.{os.getpid()}.tmp"
            Path(tmp).write_text(unit["unit"])
            os.replace(tmp, stop_file)  # appears whole
            while True:
                time.sleep(1)
        if stop_file and os.environ.get("PF_HOLD_AT_UNIT") == str(self.units_begun):
            deadline = time.time() + HOLD_LIMIT_S
            while not os.path.exists(stop_file) and time.time() < deadline:
                time.sleep(0.05)
        return super().__call__(unit)


def main() -> None:
    from tasks.config import load_config
    from tasks.generate.job import run_generate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    print(json.dumps(run_generate(load_config(args.config), worker_cls=StoppingWorker), indent=1), flush=True)


if __name__ == "__main__":
    main()
