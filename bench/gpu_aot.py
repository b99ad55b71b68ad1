"""The train step compiled for an H100 or H200 on a machine without a GPU: XLA's GPU program, read here.

What the lent GPU sessions cannot afford (minutes of device time) is reading which kernels XLA makes
of our step.  JAX compiles for a GPU it does not have when given a target description
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`): the GPU
plugin and cuDNN's library must be importable, no driver or device is needed.  This script builds
the step `bench/train_throughput.py` times (same options), lowers it for a (1,1,1) mesh on that
target, compiles it, and prints:

  the compile's memory analysis   arguments and temporaries, as XLA's GPU buffer assignment has them
  per loop (layer scans, the loss's chunk loop, trip counts) and outside them: every kernel-level
                                  instruction (fusion, custom call, copy) with its kind, its output
                                  shape and the bytes it must move (operands + outputs; inside a
                                  loop a stacked [L, ...] operand counts 1/L; an operand the kernel
                                  slices or gathers from, directly or after elementwise ops, counts
                                  the elements read: throughput_notes' tables before "The floors'
                                  counting, refined" counted it whole, and the rotary forward's
                                  slice after the bias add whole until "The GPU machine's versions"),
                                  and that traffic's time at
                                  --bandwidth (the floor a bandwidth-bound kernel cannot beat)
  totals per category             GEMMs (FLOPs), attention, elementwise (kLoop), reductions
                                  (kInput), slices and updates of stacked buffers (dynamic-slice
                                  fusions: memcpy on the device), other

With --decode-batch N it compiles the KV-cached decode loop (`generate.decode`, bf16 weights) for N
rows instead; --no-scan-layers then holds the weights per layer, as `generate --layers unrolled` does.

The floors are not timings: set them beside a profile (bench/profile_step.py) to see which kernels
run far from bandwidth.  XLA's autotuner does not run without a device (GEMM configs are defaults),
and the GPU machine's jax (0.11) may fuse a little differently from this one.

The GPU packages it needs (JAX's CUDA plugin, cuDNN's library) are what `launch/setup.sh` installs
into VENV/gpu-target for `neox-jax plan --target` (neox_jax/train/gpu_target.py):

    PYTHONPATH=. .venv/bin/python bench/gpu_aot.py --target h200 --remat dots_attn \
        --hlo /tmp/step_h200.txt.gz --json /tmp/step_h200.json
    PYTHONPATH=. .venv/bin/python bench/gpu_aot.py --decode-batch 1 --no-scan-layers
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_jax.train import gpu_target  # noqa: E402

gpu_target.use_packages()  # before jax: the CUDA plugin's cuDNN bindings load with it
import train_throughput as TT  # noqa: E402  (the benchmark's option parser and builders)

from neox_jax.train.plan import _DTYPE_BYTES, _SHAPE, analyse_hlo  # noqa: E402  (plan's HLO reading)

_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> (.*) \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) (fusion|custom-call|copy|while|dot|convolution)\((.*)$")


def arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def nbytes(items, layers: int | None = None) -> int:
    """Bytes of (dtype, shape) items; an array whose leading dim is `layers` (a stacked buffer a
    layer loop slices or updates in place) counts one layer."""
    total = 0
    for t, shape in items:
        n = math.prod(shape) * _DTYPE_BYTES.get(t, 4)
        if layers and len(shape) > 1 and shape[0] == layers:
            n //= layers
        total += n
    return total


_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_SLICING = ("slice", "dynamic-slice", "gather")


def sliced_reads(body: list[str]) -> dict[int, int]:
    """{parameter index: bytes read} for the parameters of a fused computation of which it reads only
    a part: the elements each value's users need, from the root (all of its output) back to the
    parameters.  A slice or gather needs its output's elements of operand 0; an op whose output has
    as many elements as the operand (elementwise ops, converts, bitcasts, reshapes, transposes) needs
    as many of it as its own output is needed; any other use needs the whole operand.  So a kernel
    that adds the QKV bias to the whole [B, S, 3, N, H] output and then slices q counts q's elements
    of it (the rotary forward); the target logit gathered from the [B, S, V] logits counts one value
    a row; one layer's KV cache sliced from the stacked cache counts that layer."""
    defs, params = [], {}
    for line in body:
        m = _DEF.match(line)
        if not m:
            continue
        name, typ, op, rest = m.groups()
        shape = arrays(typ)
        size = math.prod(shape[0][1]) if len(shape) == 1 else None  # None: a tuple (a multi-output root)
        if op == "parameter":
            params[name] = (int(re.match(r"\d+", rest).group(0)), _DTYPE_BYTES.get(shape[0][0], 4))
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0]) if op != "parameter" else []
        defs.append((name, op, size, operands, line.lstrip().startswith("ROOT")))
    sizes = {name: size for name, _, size, _, _ in defs}
    need: dict[str, float] = defaultdict(float)
    for name, op, size, operands, root in reversed(defs):  # users come after their operands
        if root:
            need[name] = size if size is not None else math.inf
        own = min(need[name], size) if size is not None else need[name]
        for i, o in enumerate(operands):
            so = sizes.get(o)
            if so is None:
                continue
            if (op in _SLICING and i == 0 and size is not None) or size == so:
                need[o] += own  # a slice reads as many elements as it writes
            else:
                need[o] += so
    reads = {}
    for name, (index, width) in params.items():
        if sizes[name] and need[name] < sizes[name]:
            reads[index] = int(need[name]) * width
    return reads


def category(op: str, kind: str, name: str, target: str) -> str:
    if op == "custom-call":
        if "cudnn$fmha" in target or "fmha" in target:
            return "attention"
        if "gemm" in target.lower() or "cublas" in target.lower():
            return "gemm"
        return "other"
    if op in ("dot", "convolution") or name.startswith(("gemm_fusion", "cublas")) or "__triton_gemm" in kind:
        return "gemm"
    if op == "copy" or "dynamic_slice_fusion" in kind or "dynamic_update_slice" in name and kind == "kCustom":
        return "slice/copy"
    return {"kLoop": "elementwise", "kInput": "reduction"}.get(kind, "other")


def analyse(hlo: str, layers: int, bandwidth: float) -> dict:
    """Per computation reached by a while loop (and the entry): its kernel-level instructions."""
    comps: dict[str, list[str]] = {}
    sigs: dict[str, str] = {}
    cur = None
    entry = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur], sigs[cur] = [], m.group(2)
            if line.startswith("ENTRY"):
                entry = cur
            continue
        if line.startswith("}"):
            cur = None
        elif cur:
            comps[cur].append(line)
    trips = {entry: 1}
    order = [entry]
    for name in order:  # breadth-first over while loops (nested trip counts multiply)
        for line in comps[name]:
            if " while(" in line:
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                trips[body] = trips[name] * (int(n.group(1)) if n else 1)
                order.append(body)
    loops, totals = [], defaultdict(lambda: {"calls": 0, "bytes": 0, "floor_ms": 0.0})
    for name in order:
        rows = []
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m or m.group(3) == "while":
                continue
            iname, out, op, rest = m.groups()
            kind = (re.search(r"kind=(\w+)", rest) or re.search(r'"kind":"(\w+)"', rest))
            kind = kind.group(1) if kind else ""
            ctarget = re.search(r'custom_call_target="([^"]+)"', rest)
            ctarget = ctarget.group(1) if ctarget else ""
            custom_name = re.search(r'"name":"(\w+)"', rest)
            if kind == "kCustom" and custom_name:
                kind = f"kCustom:{custom_name.group(1)}"
            called = re.search(r"calls=%([\w.\-]+)", rest)
            fused = called.group(1) if called and called.group(1) in sigs else None
            ins = arrays(sigs[fused]) if fused else arrays(rest.split("),")[0])
            reads = sliced_reads(comps[fused]) if fused else {}
            outs = arrays(out)
            per_layer = layers if trips[name] > 1 else None
            # (a dynamic-update-slice moves its update, not the buffer it updates in place)
            in_place = "dynamic_update_slice" in iname and any(a in outs for a in ins)
            b_in = sum(reads[i] if i in reads else 0 if in_place and a in outs else nbytes([a], per_layer)
                       for i, a in enumerate(ins))
            b = 2 * b_in if in_place else b_in + nbytes(outs, per_layer)
            cat = category(op, kind, iname, ctarget)
            rows.append({"name": iname, "op": op, "kind": kind or ctarget, "category": cat, "out": out[:120],
                         "bytes": b, "floor_us": b / bandwidth * 1e6})
            t = totals[cat]
            t["calls"] += trips[name]
            t["bytes"] += b * trips[name]
            t["floor_ms"] += b / bandwidth * 1e3 * trips[name]
        loops.append({"computation": name, "trips": trips[name], "kernels": rows})
    return {"loops": loops, "totals": dict(totals), "matmul_flops": analyse_hlo(hlo)[1]}


def decode_program(args, devices):
    """(model config, compiled `generate.decode`: greedy, --decode-batch rows, a 128-token prompt and
    128 new tokens, bf16 weights as `model.inference_params` keeps them; --no-scan-layers: the
    weights held per layer, as `generate --layers unrolled` holds them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from neox_jax import model as M
    from neox_jax.config import load_config
    from neox_jax.generate import Sampling, decode, prefill, unstack_layers

    cfg = load_config(args.model).replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), PartitionSpec())

    def on_target(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)

    params = jax.eval_shape(lambda: M.init_params(cfg, 0))
    if not args.scan_layers:
        cfg, params = cfg.replace(scan_layers=False), jax.eval_shape(unstack_layers, params)
    B, P, new = args.decode_batch, 128, 128
    ins = [jax.ShapeDtypeStruct((B, P), jnp.int32), jax.ShapeDtypeStruct((B, P), bool),
           jax.ShapeDtypeStruct((B,), bool), jax.ShapeDtypeStruct((B,), jnp.int32),
           jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((1,), jnp.int32)]
    params, ins = jax.tree.map(on_target, params), [on_target(x) for x in ins]
    state = jax.eval_shape(lambda *a: prefill(cfg, Sampling(), *a, max_new=new), params, *ins)
    lowered = decode.lower(cfg, Sampling(), params, jax.tree.map(on_target, state), ins[3], ins[4], ins[5],
                           on_target(jax.ShapeDtypeStruct((), jnp.int32)))
    return cfg, lowered.compile()


def main(argv=None) -> int:
    ap = TT.build_parser()
    ap.description = __doc__
    ap.add_argument("--target", choices=sorted(gpu_target.CARDS), default="h200")
    ap.add_argument("--hlo", default="", help="write the compiled GPU program (HLO text, gzipped) here")
    ap.add_argument("--top", type=int, default=30, help="non-GEMM kernels to list, by traffic x trips")
    ap.add_argument("--decode-batch", type=int, default=0,
                    help="compile the KV-cached decode loop (generate.decode) for this many rows instead of the "
                         "train step (bf16 weights; --no-scan-layers: weights held per layer)")
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    import neox_jax.model as M
    from neox_jax.sharding import make_mesh
    from neox_jax.train import state as S
    from neox_jax.train import step as T

    devices = gpu_target.devices(args.target, 1)
    if args.decode_batch:
        t0 = time.perf_counter()
        cfg, compiled = decode_program(args, devices)
        return report(args, cfg, compiled, time.perf_counter() - t0,
                      f"decode, batch {args.decode_batch}, layers {'scan' if cfg.scan_layers else 'unrolled'}")
    args.attention_resolved = "cudnn" if args.attention == "auto" else args.attention
    args.parallel_default = {"true": True, "false": False}.get(args.parallel_residual)
    cfg = TT.model_config(args)
    run = TT.run_config(args, cfg)
    mesh = make_mesh(1, 1, 1, devices=devices)
    opt = S.make_optimizer(run)
    sh = S.state_shardings(run, mesh, opt)
    state = S.abstract_state(run, opt, sh)
    with jax.set_mesh(mesh):
        batch = {"tokens": jax.ShapeDtypeStruct((run.train.batch_size, args.seq + 1), np.int32,
                                                sharding=T.batch_sharding(mesh))}
        with M.compiling_for("gpu"):  # cuDNN attention traced for the GPU being compiled for
            lowered = T.make_train_step(run, mesh, opt, sh).lower(state, batch)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
    return report(args, cfg, compiled, compile_s,
                  f"train step, seq {args.seq} mb {args.micro_batch} remat {cfg.remat} attention {cfg.attention} "
                  f"bias_grad {cfg.bias_grad} loss_chunk {run.train.loss_chunk} "
                  f"layers {'scan' if cfg.scan_layers else 'unrolled'}")


def report(args, cfg, compiled, compile_s: float, what: str) -> int:
    import jax

    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    bw = gpu_target.CARDS[args.target]["bandwidth"]
    res = analyse(hlo, cfg.num_layers, bw)
    res.update(target=args.target, compile_s=compile_s, jax=jax.__version__, model=args.model, program=what,
               memory={"argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                       "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes})
    print(f"{gpu_target.CARDS[args.target]['name']} (deviceless, jax {jax.__version__}): {args.model} {what}; compiled in "
          f"{compile_s:.1f} s")
    print(f"memory: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{mem.temp_size_in_bytes / 2**30:.2f} GiB")
    print(f"matmul FLOPs per step {res['matmul_flops'] / 1e12:.1f} T (loops x trip counts; cuDNN attention not counted)")
    print(f"{'category':<12} {'calls':>6} {'GB moved':>9} {'floor ms':>9}")
    for cat, t in sorted(res["totals"].items(), key=lambda kv: -kv[1]["floor_ms"]):
        print(f"{cat:<12} {t['calls']:>6} {t['bytes'] / 1e9:>9.2f} {t['floor_ms']:>9.2f}")
    rows = [(r["floor_us"] * loop["trips"] / 1e3, loop["trips"], r) for loop in res["loops"] for r in loop["kernels"]
            if r["category"] not in ("gemm", "attention")]
    print(f"\nnon-GEMM kernels by floor x trips (bandwidth {bw / 1e12:.1f} TB/s; a decode loop's trips are "
          f"per token):")
    print(f"{'ms/step':>8} {'trips':>5} {'MB':>8}  {'category':<12} name -> output")
    for ms, trips, r in sorted(rows, key=lambda x: -x[0])[:args.top]:
        print(f"{ms:8.2f} {trips:5d} {r['bytes'] / 1e6:8.1f}  {r['category']:<12} {r['name']} -> {r['out'][:70]}")
    if args.hlo:
        with gzip.open(args.hlo, "wt") as f:
            f.write(hlo)
        print(f"compiled program: {args.hlo}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
