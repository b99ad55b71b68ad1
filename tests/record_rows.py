"""`python tests/record_rows.py OUT_PREFIX neox-jax-args...`: run the neox-jax CLI with the training
loop's Loader wrapped so that every batch this process feeds is also saved to
OUT_PREFIX-process-I.npy ([steps, local rows, S+1] tokens), for tests/multiprocess_test.py to check
each process's rows against the data order."""

import sys

import numpy as np

from neox_jax import cli
from neox_jax.train import loop


class RecordingLoader(loop.Loader):
    rows: list = []

    def __next__(self):
        batch = super().__next__()
        RecordingLoader.rows.append(batch["tokens"].copy())
        return batch


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    loop.Loader = RecordingLoader
    status = cli.main(argv)
    import jax

    np.save(f"{out}-process-{jax.process_index()}.npy", np.stack(RecordingLoader.rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
