"""Bounded-memory check of `neox-jax convert` on a pythia-1.4b-shaped checkpoint (random fp16 weights).

    python bench/convert_memory.py [--workdir /tmp/neox_convert_bench] [--preset pythia-1.4b] [--keep]

1. Writes a random HF checkpoint (config.json + one model.safetensors, fp16, ~2.8 GB for 1.4b),
   tensor by tensor with a hand-written safetensors header (no torch model is built).
2. Runs, each in its own process, measuring wall time and peak RSS (GNU `/usr/bin/time -v`):
     - the import baseline (the modules convert loads, nothing converted),
     - convert HF -> orbax, orbax -> HF, HF -> neox --tp 2, HF as pytorch_model.bin -> orbax,
     - `cp -r` of the source directory (the time to beat).
3. Prints a table and deletes everything unless --keep.

The page cache is warm for every step after the first read (nothing is dropped), so the times
compare like with like: cp and convert both read cached files and write new ones.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neox_jax.config import load_config  # noqa: E402
from neox_jax.convert.hf import hf_config_dict, hf_order  # noqa: E402
from neox_jax.convert.mapping import hf_name, our_entries, torch_shape  # noqa: E402


def make_hf(cfg, path: Path, seed: int = 0) -> int:
    """Random fp16 weights in HF layout, streamed into one safetensors file; returns its size."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, "float16"), indent=2))
    items = []
    off = 0
    for e in hf_order(our_entries(cfg, np.float16)):
        shape = torch_shape(e.name, cfg)
        n = int(np.prod(shape)) * 2
        items.append((hf_name(e.name, e.layer), shape, off, off + n))
        off += n
    header = {"__metadata__": {"format": "pt"}}
    header.update({k: {"dtype": "F16", "shape": list(s), "data_offsets": [a, b]} for k, s, a, b in items})
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for key, shape, _, _ in items:
            if "layernorm" in key or "layer_norm" in key:
                a = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
            else:
                a = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
            f.write(a.tobytes())
    return (path / "model.safetensors").stat().st_size


def make_bin(src: Path, dst: Path) -> None:
    """The same weights as one pytorch_model.bin (torch.save, zip format), as old HF revisions have."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    torch.save(sd, dst / "pytorch_model.bin")
    del sd


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit status) of one command, measured by GNU time -v.

    (Not ru_maxrss from wait4 on a child of this process: a forked child inherits the parent's
    resident-set high-water mark, which would hide the command's own peak.)"""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    secs = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = int(m.group(1)) / 2**10 if m else float("nan")
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}", file=sys.stderr)
    return secs, rss, proc.returncode


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/neox_convert_bench")
    ap.add_argument("--preset", default="pythia-1.4b")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    cfg = load_config(args.preset)
    need = 4 * cfg.num_params() * 2
    if free < need:
        print(f"need ~{need / 1e9:.1f} GB free in {work}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    py = sys.executable
    env_cmd = [py, "-m", "neox_jax", "-q"]
    try:
        t0 = time.perf_counter()
        size = make_hf(cfg, work / "hf")
        print(f"made {work / 'hf'}: {cfg.num_params():,} parameters, {size / 1e9:.2f} GB fp16 "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        largest = max(np.prod(torch_shape(e.name, cfg)) * 2 for e in our_entries(cfg))
        rows = []
        rows.append(("import baseline (no conversion)",) + run(
            [py, "-c", "import neox_jax.convert.stream, neox_jax.convert.hf, neox_jax.convert.orbax_io, "
                       "neox_jax.convert.neox, torch, tensorstore, orbax.checkpoint, jax"]))
        rows.append(("cp -r hf hf_copy",) + run(["cp", "-r", str(work / "hf"), str(work / "hf_copy")]))
        shutil.rmtree(work / "hf_copy")
        rows.append(("convert hf -> orbax",) + run(env_cmd + ["convert", str(work / "hf"), str(work / "orbax")]))
        rows.append(("convert orbax -> hf",) + run(
            env_cmd + ["convert", str(work / "orbax"), str(work / "hf2"), "--to", "hf"]))
        rows.append(("convert hf -> neox --tp 2",) + run(
            env_cmd + ["convert", str(work / "hf"), str(work / "neox"), "--to", "neox", "--tp", "2"]))
        make_bin(work / "hf", work / "hf_bin")
        rows.append(("convert hf (pytorch_model.bin) -> orbax",) + run(
            env_cmd + ["convert", str(work / "hf_bin"), str(work / "orbax_from_bin")]))
        shutil.rmtree(work / "hf_bin")
        rows.append(("cp -r hf hf_copy (again)",) + run(["cp", "-r", str(work / "hf"), str(work / "hf_copy")]))
        sizes = {n: du(work / n) for n in ("hf", "orbax", "hf2", "neox") if (work / n).exists()}
        print(f"\nlargest tensor {largest / 1e6:.0f} MB (fp16), checkpoint {size / 1e9:.2f} GB; "
              f"sizes on disk: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
        print(f"{'step':<42}{'seconds':>9}{'peak RSS MiB':>14}{'exit':>6}")
        for name, secs, rss, code in rows:
            print(f"{name:<42}{secs:>9.1f}{rss:>14.0f}{code:>6}")
        ok = all(r[3] == 0 for r in rows)
        if ok:
            diff = run(env_cmd + ["diff", str(work / "hf"), str(work / "hf2")])
            print(f"{'diff hf hf2 (bit-identical?)':<42}{diff[0]:>9.1f}{diff[1]:>14.0f}{diff[2]:>6}")
            ok = diff[2] == 0
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
