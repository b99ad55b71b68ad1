"""Loader throughput on a synthetic NeoX dataset (seq 2048) against what pythia-1.4b training consumes.

    python bench/loader_throughput.py [--tokens 60e6] [--batch 1024] [--steps 8] [--threads 2]

Writes a temporary uint16 .bin/.idx (documents of 1..4000 tokens, mean ~2000, ending in EOD), builds
GPT-NeoX's index maps, then times `Loader` (GPT2Dataset order, this process = the only host) over
`--steps` global batches, after one warm-up batch.  The files were just written, so they sit in the
page cache: this measures the loader, not the disk.

Training need: environment-notes.md measured a plain JAX pythia-1.4b train step at 51.9k-56.0k tokens/s
on one H200 (an H100 is slower); we use 56,000 tokens/s / 2048 = 27.3 samples/s as the upper bound.
Prints numbers only; nothing here gates tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from neox_jax.data.indexed import IndexedDatasetWriter
from neox_jax.data.loader import Loader
from neox_jax.data.order import GPT2Dataset

NEEDED_TOKENS_PER_S = 56_000  # pythia-1.4b, seq 2048, one H200, best plain-JAX figure in environment-notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=60e6, help="synthetic dataset size in tokens")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024, help="global batch (Pythia: 1024)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--segment-ids", action="store_true")
    args = ap.parse_args()
    seq = args.seq_length
    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d) / "synthetic_text_document"
        rng = np.random.RandomState(0)
        t0 = time.perf_counter()
        written = 0
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            while written < args.tokens:
                doc = rng.randint(2, 50000, size=rng.randint(1, 4000)).astype(np.uint16)
                doc[-1] = 0
                w.add_document(doc)
                written += len(doc)
        t_write = time.perf_counter() - t0
        need = (args.steps + 1) * args.batch
        t0 = time.perf_counter()
        ds = GPT2Dataset.build(str(prefix), need, seq, 1234)
        t_maps = time.perf_counter() - t0
        print(f"dataset: {written / 1e6:.1f}M tokens written in {t_write:.1f}s; "
              f"index maps for {need} samples in {t_maps:.2f}s ({ds.maps.num_epochs} epoch(s), {len(ds)} samples)")
        with Loader(ds, args.batch, num_steps=args.steps + 1, process_index=0, process_count=1,
                    prefetch=args.prefetch, num_threads=args.threads, segment_ids=args.segment_ids) as loader:
            next(loader)  # warm-up: thread start, first pages
            t0 = time.perf_counter()
            n = 0
            for batch in loader:
                n += batch["tokens"].shape[0]
            dt = time.perf_counter() - t0
    rate = n / dt
    needed = NEEDED_TOKENS_PER_S / seq
    print(f"loader: {n} samples of {seq + 1} tokens in {dt:.2f}s = {rate:,.0f} samples/s "
          f"({rate * seq / 1e6:.2f}M tokens/s), {args.threads} thread(s), prefetch {args.prefetch}")
    print(f"pythia-1.4b training on one GPU consumes <= {needed:.1f} samples/s "
          f"({NEEDED_TOKENS_PER_S:,} tokens/s): loader headroom x{rate / needed:,.0f}")


if __name__ == "__main__":
    main()
