"""The `neox-jax plan` tables of docs/scaling.md, regenerated in one command (about 20 minutes on a
2-core CPU: one AOT compile per row, each in its own process).

    PYTHONPATH=. python bench/plan_tables.py [--out DIR] [--only neox-20b|pythia-12b]

Prints one markdown row per plan; the JSON of each plan is kept under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = ["--set", "model.compute_dtype=bfloat16", "--set", "optimizer.loss_scale=none",
          "--set", "train.grad_accum=1", "--device-memory", "80GiB"]
TABLES = {
    "neox-20b": dict(devices=64, batch=64, meshes=["1,64,1", "1,16,4", "8,8,1"], remats=["none", "full", "dots"]),
    "pythia-12b": dict(devices=16, batch=32, meshes=["1,16,1", "1,8,2", "1,4,4"], remats=["none", "full", "dots"]),
}


def gib(b: float) -> str:
    return f"{b / 2**30:.1f}"


def row(p: dict) -> str:
    m = p["mesh"]
    c = p["collectives"]

    def coll(kind: str) -> str:
        x = c[kind]
        return f"{x['count']} x, {gib(x['bytes_accelerator'])} GiB" if x["count"] else "-"

    return (f"| {m['data']} x {m['fsdp']} x {m['tensor']} | {p['remat']} | {p['param_bytes'] / 2**30:.2f} | "
            f"{p['optimizer_bytes'] / 2**30:.2f} | {gib(p['temp_bytes'])} | {gib(p['peak_bytes'])} | "
            f"{'yes' if p['fits'] else '**no**'} | {p['flops_hlo'] / 1e12:.0f} / {p['flops_model'] / 1e12:.0f} | "
            f"{coll('all-reduce')} | {coll('all-gather')} | {p['compile_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/plans")
    ap.add_argument("--only", choices=sorted(TABLES))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model, t in TABLES.items():
        if args.only and model != args.only:
            continue
        print(f"### {model} on {t['devices']} devices, batch {t['batch']} x 2048", flush=True)
        for mesh in t["meshes"]:
            for remat in t["remats"]:
                path = out / f"{model}_{mesh.replace(',', 'x')}_{remat}.json"
                cmd = [sys.executable, "-m", "neox_jax", "plan", f"configs/train/{model}.yaml", "--devices",
                       str(t["devices"]), "--mesh", mesh, "--json", "--set", f"model.remat={remat}",
                       "--set", f"train.batch_size={t['batch']}", *COMMON]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    print(f"| {mesh} | {remat} | failed: {r.stderr.strip().splitlines()[-1:]} |", flush=True)
                    continue
                p = json.loads(r.stdout.strip().splitlines()[-1])
                path.write_text(json.dumps(p, indent=1))
                print(row(p), flush=True)


if __name__ == "__main__":
    main()
