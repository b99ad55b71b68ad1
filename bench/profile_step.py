"""Where the time of one train step goes: a JAX profiler trace of our step, summed by kernel.

Builds exactly the step `bench/train_throughput.py` times (same options: --model, --seq,
--micro-batch, --remat, --attention, ...), runs --warmup steps, traces --steps steps with
`jax.profiler`, then reads the trace back with `jax.profiler.ProfileData` (no TensorBoard needed)
and prints, per step: device time by category (matmul, attention, fusions, copies, other) and the
top kernels by time.  Categories come from kernel names (regexes below); "busy" is the sum of
kernel times, so busy < step time means the device waited (host, launch gaps).

    PYTHONPATH=. python3 bench/profile_step.py --json $OUT/profile.json            # GPU, 1.4b mb 8
    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/profile_step.py --model tiny --seq 64 --micro-batch 2 \
        --attention xla --dtype float32 --steps 2 --warmup 1                       # CPU smoke run
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as TT  # noqa: E402  (the benchmark's option parser and builders)

CATEGORIES = (  # first match wins; kernel names as cuBLAS/cuDNN/XLA emit them
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|dot|wgmma|sm90_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduce", re.compile(r"reduce|reduction", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|elementwise|convert|transpose|broadcast", re.I)),
)


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def device_events(xspace_path: str) -> dict[str, list[tuple[str, float]]]:
    """{line name: [(event name, ms)]} for every line of the device planes (GPU), or of the host
    plane's XLA threads when there is no device plane (CPU)."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xspace_path)
    planes = [p for p in pd.planes if p.name.startswith("/device:")]
    out: dict[str, list[tuple[str, float]]] = {}
    if planes:
        for p in planes:
            for ln in p.lines:
                out[f"{p.name} {ln.name}"] = [(ev.name, ev.duration_ns / 1e6) for ev in ln.events]
    else:
        for p in pd.planes:
            for ln in p.lines:
                if ln.name.startswith("tf_XLA"):
                    out.setdefault("host XLA threads", []).extend((ev.name, ev.duration_ns / 1e6) for ev in ln.events)
    return out


def summarise(events: dict[str, list[tuple[str, float]]], steps: int, top: int) -> dict:
    # kernel lines: GPU streams ("Stream #..."); skip the summary lines (XLA Modules/Ops/TraceMe), whose
    # events overlap the kernels they contain
    kernel_lines = {k: v for k, v in events.items()
                    if not re.search(r"XLA Modules|XLA Ops|TraceMe|Steps|Source|Framework|Launch", k)}
    by_name: dict[str, list[float]] = {}
    for evs in kernel_lines.values():
        for name, ms in evs:
            by_name.setdefault(name, []).append(ms)
    total = sum(sum(v) for v in by_name.values())
    cats: dict[str, float] = {}
    for name, v in by_name.items():
        cats[category(name)] = cats.get(category(name), 0.0) + sum(v)
    rows = sorted(((sum(v) / steps, len(v) / steps, name) for name, v in by_name.items()), reverse=True)
    ops_line = next((v for k, v in events.items() if "XLA Ops" in k), None)
    ops = {}
    if ops_line:
        for name, ms in ops_line:
            ops[name] = ops.get(name, 0.0) + ms
    return {
        "lines": {k: len(v) for k, v in events.items()},
        "busy_ms_per_step": total / steps,
        "category_ms_per_step": {k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms_per_step": ms, "calls_per_step": n, "name": name[:160]} for ms, n, name in rows[:top]],
        "top_xla_ops": [{"ms_per_step": ms / steps, "name": name[:160]}
                        for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]],
    }


def main(argv=None) -> int:
    ap = TT.build_parser()
    ap.description = __doc__
    ap.add_argument("--top", type=int, default=25, help="kernels to list (default 25; the JSON keeps --json-top)")
    ap.add_argument("--json-top", type=int, default=400, help="kernels and XLA ops kept in the JSON (default 400)")
    ap.add_argument("--hlo", default="", help="also write the compiled (optimized) HLO of the step here, gzipped "
                                              "(e.g. hlo.txt.gz): which fusion is which kernel, read on any machine")
    args = ap.parse_args(argv)
    import jax

    from neox_jax.sharding import make_mesh
    from neox_jax.train import state as S
    from neox_jax.train import step as T

    backend = jax.default_backend()
    args.attention_resolved = ("cudnn" if backend == "gpu" else "xla") if args.attention == "auto" else args.attention
    args.parallel_default = {"true": True, "false": False}.get(args.parallel_residual)
    cfg = TT.model_config(args)
    run = TT.run_config(args, cfg)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    with jax.set_mesh(mesh):
        state = S.init_state(run, mesh, opt, shardings=sh)
        step = T.make_train_step(run, mesh, opt, sh).lower(
            state, {"tokens": jax.ShapeDtypeStruct((run.train.batch_size, args.seq + 1), "int32",
                                                   sharding=T.batch_sharding(mesh))}).compile()
        batch = {"tokens": jax.device_put(TT.random_tokens(cfg, run.train.batch_size, args.seq, args.seed, 1)[0],
                                          T.batch_sharding(mesh))}
        for _ in range(args.warmup):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        d = tempfile.mkdtemp(prefix="neox_profile_")
        jax.profiler.start_trace(d)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append((time.perf_counter() - t0) * 1e3)
        jax.profiler.stop_trace()
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {d}")
    res = summarise(device_events(files[0]), args.steps, max(args.top, args.json_top))
    res.update(step_ms_median=statistics.median(times), step_ms=times, device=jax.devices()[0].device_kind,
               settings={"model": args.model, "seq": args.seq, "micro_batch": args.micro_batch,
                         "remat": cfg.remat, "attention": cfg.attention, "dtype": cfg.compute_dtype})
    print(f"{res['device']}: {args.model} seq {args.seq} mb {args.micro_batch} remat {cfg.remat} "
          f"attention {cfg.attention}; step {res['step_ms_median']:.1f} ms (traced), kernels busy "
          f"{res['busy_ms_per_step']:.1f} ms/step")
    print("by category (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in res["category_ms_per_step"].items()))
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for r in res["top_kernels"][:args.top]:
        print(f"{r['ms_per_step']:8.2f} {r['calls_per_step']:6.0f}  {r['name'][:110]}")
    if res["top_xla_ops"]:
        print(f"{'ms/step':>8}  XLA op")
        for r in res["top_xla_ops"][:args.top]:
            print(f"{r['ms_per_step']:8.2f}  {r['name'][:110]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.hlo:
        with gzip.open(args.hlo, "wt") as f:
            f.write(step.as_text())
        print(f"optimized HLO: {args.hlo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
