"""Read-time cost of checksum verification (issue 8): load a pythia-410m-shaped checkpoint with
`load_params` plainly and with `verify=True`, alternating, and print seconds and the overhead.

    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/checksum_cost.py [--preset pythia-410m] [--reps 3] [--dir D]

The checkpoint holds random values (not an initialised model: only the bytes matter), written once
with `save_params` into D (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from neox_jax import checksums
from neox_jax.checkpoint import load_params, save_params
from neox_jax.config import load_config
from neox_jax.model import abstract_params
from neox_jax.tree import flatten


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pythia-410m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    args = ap.parse_args()
    cfg = load_config(args.preset)
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckcost-"))
    ck = work / "ck"
    try:
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32).astype(s.dtype),
                              abstract_params(cfg))
        nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
        t = time.perf_counter()
        save_params(ck, cfg, params, overwrite=True)
        save_s = time.perf_counter() - t
        del params
        times: dict[str, list[float]] = {"plain": [], "verify": [], "checksums_only": []}
        digests = checksums.read(ck)
        for _ in range(args.reps):
            for mode in ("plain", "verify"):
                t = time.perf_counter()
                _, p = load_params(ck, verify=mode == "verify")
                jax.block_until_ready(p)
                times[mode].append(time.perf_counter() - t)
                if mode == "plain":  # the verification step alone, on the restored arrays
                    t = time.perf_counter()
                    checksums.check_tree(digests, flatten(p), str(ck))
                    times["checksums_only"].append(time.perf_counter() - t)
                del p
        plain, verify = min(times["plain"]), min(times["verify"])
        print(json.dumps({"preset": args.preset, "param_bytes": nbytes, "save_s": round(save_s, 2),
                          "plain_s": [round(x, 2) for x in times["plain"]],
                          "verify_s": [round(x, 2) for x in times["verify"]],
                          "checksums_only_s": [round(x, 2) for x in times["checksums_only"]],
                          "checksums_only_pct_of_plain": round(100 * min(times["checksums_only"]) / plain, 1),
                          "threads": checksums._workers(),
                          "overhead_s": round(verify - plain, 2),
                          "overhead_pct": round(100 * (verify - plain) / plain, 1),
                          "devices": str(jax.devices()[0].platform)}))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
