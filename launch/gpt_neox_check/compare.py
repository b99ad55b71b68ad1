"""compare.py NAME REF.npy GOT.npy TOL RESULTS_FILE -- max abs logit difference of one case.

Shapes must be equal (both sides have the full 256-row vocabulary here).
Appends 'NAME<TAB>max_abs_diff<TAB>max_abs_ref<TAB>OK|FAIL' to RESULTS_FILE; exit 1 on FAIL or a missing file."""

import sys
from pathlib import Path

import numpy as np

name, ref_p, got_p, tol, results = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
with open(results, "a") as out:
    if not Path(ref_p).is_file() or not Path(got_p).is_file():
        missing = ref_p if not Path(ref_p).is_file() else got_p
        print(f"{name:34s} MISSING {missing}")
        out.write(f"{name}\tmissing\t-\tFAIL\n")
        sys.exit(1)
    ref, got = np.load(ref_p), np.load(got_p)
    if got.shape != ref.shape:
        print(f"{name:34s} SHAPE {got.shape} vs {ref.shape}")
        out.write(f"{name}\tshape {got.shape} vs {ref.shape}\t-\tFAIL\n")
        sys.exit(1)
    d = float(np.abs(got.astype(np.float64) - ref).max())
    ok = d <= tol
    print(f"{name:34s} max|diff| = {d:.3e}   (max|logit| {np.abs(ref).max():.3f}, tol {tol:g})  {'OK' if ok else 'FAIL'}")
    out.write(f"{name}\t{d:.3e}\t{np.abs(ref).max():.3f}\t{'OK' if ok else 'FAIL'}\n")
    sys.exit(0 if ok else 1)
