"""`python tests/failing_save.py [--hang SENTINEL] STEP PROCESS DISPATCHED neox-jax-args...`: run the
neox-jax CLI with the background checkpoint write of step STEP failing in process PROCESS (-1: every
process): the loader item's commit future raises ENOSPC naming its file, as a full disk would, after
the step's temporary directory exists and the loop has moved on.  With --hang that future instead
writes the file SENTINEL and never returns (a write that stalls: the test then kills the process).
Each batch the loop takes (one per step it starts) appends a line to the file DISPATCHED ('-': none).
For tests/train_checkpoints_test.py and tests/multiprocess_test.py."""
import errno
import os
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from neox_jax import cli
from neox_jax.data.loader import Loader


class _Full:
    def __init__(self, path: str):
        self.path = path

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)


class _Hung:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def result(self, timeout=None):
        Path(self.sentinel).write_text("saving")
        time.sleep(3600)


def main() -> int:
    args = sys.argv[1:]
    hang = args[1] if args[0] == "--hang" else None
    args = args[2:] if hang else args
    step, process, dispatched, argv = int(args[0]), int(args[1]), args[2], args[3:]
    json_save = ocp.handlers.JsonCheckpointHandler.async_save

    async def failing_write(self, directory, item=None, args=None):
        futures = await json_save(self, directory, item=item, args=args)
        if "global_batch" in args.item and args.item["step"] == step and process in (-1, jax.process_index()):
            futures = list(futures) + [_Hung(hang) if hang else _Full(str(directory / "loader.json"))]
        return futures

    ocp.handlers.JsonCheckpointHandler.async_save = failing_write
    if dispatched != "-":
        next_batch = Loader.__next__

        def counted(self):
            with open(dispatched, "a") as f:
                f.write("step\n")
            return next_batch(self)

        Loader.__next__ = counted
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
