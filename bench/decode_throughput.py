"""Decode throughput: ours (KV-cached, jitted while_loop) beside HF transformers `generate`.

Same random weights in both (ours converted to HF with `params_to_hf`), greedy, a prompt of
--prompt random tokens and --new generated tokens (no stop token, so every step runs).  For each
batch size the table has: prefill tokens/s (the prompt forward that fills the cache) and decode
ms/step (one new token for every row of the batch; ms/token at batch 1).  Ours is timed per phase
(`generate.prefill`, then one `generate.decode` call for the remaining steps), after a warm-up
call that compiles; HF's decode time is `generate()` minus a timed prompt forward.

    python bench/decode_throughput.py                     # CPU: pythia-70m shapes, fp32, batch 1 and 32
    python bench/decode_throughput.py --gpu               # GPU: pythia-1.4b shapes, bf16 (HF with SDPA)
    python bench/decode_throughput.py --preset pythia-410m --batches 1,8 --dtype float32 --timeout 600
    python bench/decode_throughput.py --gpu --int8 --no-hf --json out.json   # int8 weights (generate --int8)
    python bench/decode_throughput.py --gpu --no-hf --layers both   # the layer scan vs straight-line layers

Everything runs under --timeout seconds (default 1800); past it the script stops with exit status
124 and prints what it has.  The weights-read floor per step (parameter bytes / device bandwidth)
is for the reader to compare: the bench does not assume a bandwidth.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import model as M
from neox_jax.config import load_config
from neox_jax.generate import Sampling, decode, prefill, unstack_layers


def _timed(fn, repeats=1):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def ours(cfg, params, tokens, new, repeats):
    B, P = tokens.shape
    mask = jnp.ones((B, P), bool)
    active = jnp.ones((B,), bool)
    rows = jnp.arange(B, dtype=jnp.int32)
    key, stop = jax.random.key(0), jnp.array([-1], jnp.int32)
    greedy = Sampling()

    def run_prefill():
        return prefill(cfg, greedy, params, tokens, mask, active, rows, key, stop, max_new=new)

    def run_decode(state):
        return decode(cfg, greedy, params, state, rows, key, stop, jnp.int32(new))

    jax.block_until_ready(run_decode(run_prefill()))  # compile both (and finish before timing)
    t_pre, t_dec = [], []
    for _ in range(repeats):
        state, tp = _timed(run_prefill)
        state, td = _timed(lambda s=state: run_decode(s))
        assert int(state.step) == new
        t_pre.append(tp)
        t_dec.append(td)
    return statistics.median(t_pre), statistics.median(t_dec) / (new - 1), np.asarray(state.tokens)


def hf(cfg, params, tokens, new, repeats, dtype, device):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_jax.config import to_hf_config
    from neox_jax.convert.mapping import params_to_hf

    hf_cfg = dict(to_hf_config(cfg))
    for k in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(k)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_cfg, attn_implementation="sdpa"))
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(cfg, params).items()}
    if "lm_head.weight" in model.state_dict() and "embed_out.weight" in sd:  # transformers 5 renamed the head
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = model.to(device=device, dtype=tdtype).eval()
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(ids, use_cache=True)
        sync()

    def gen():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=1)
        sync()
        return out

    gen()  # warm-up
    _, t_pre = _timed(forward, repeats)
    out, t_all = _timed(gen, repeats)
    return t_pre, (t_all - t_pre) / (new - 1), out[:, tokens.shape[1]:].cpu().numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="pythia-1.4b shapes on the GPU (default: pythia-70m, CPU)")
    ap.add_argument("--preset", help="model shape (default pythia-70m, or pythia-1.4b with --gpu)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"],
                    help="default: bfloat16 with --gpu, float32 on CPU (where bf16 matmuls are emulated and slow)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions (median)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers column")
    ap.add_argument("--int8", action="store_true", help="ours with int8 weights (neox_jax/quant.py); HF keeps "
                                                         "the float ones")
    ap.add_argument("--layers", choices=["scan", "unrolled", "both"], default="scan",
                    help="ours with the layers in a lax.scan (model.scan_layers, the default), as straight-line "
                         "code, or both (an extra column, same tokens required)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()

    def on_timeout(*_):
        print(f"timed out after {args.timeout} s", flush=True)
        sys.exit(124)

    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(args.timeout)
    backend = jax.default_backend()
    if args.gpu and backend != "gpu":
        sys.exit(f"--gpu: JAX runs on {backend!r}, not a GPU")
    if not args.gpu and backend == "gpu":
        print("note: a GPU is present; --gpu selects the pythia-1.4b shapes")
    preset = args.preset or ("pythia-1.4b" if args.gpu else "pythia-70m")
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    cfg = load_config(preset).replace(param_dtype=args.dtype, compute_dtype=args.dtype)
    params = M.init_params(cfg, 0)
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    ours_params = params
    if args.int8:
        from neox_jax import quant

        ours_params = jax.jit(quant.quantize_params)(params)
        print(f"int8 weights: {quant.nbytes(ours_params) / 2**30:.2f} GiB (from {n_bytes / 2**30:.2f} GiB)")
    import torch

    device = "cuda" if args.gpu else "cpu"
    print(f"{preset} ({cfg.num_params() / 1e6:,.0f}M params, {n_bytes / 2**30:.2f} GiB in {args.dtype}), "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; JAX {jax.__version__} on "
          f"{jax.devices()[0].device_kind} ({len(jax.devices())} device(s)), torch {torch.__version__} on {device}"
          f" with {torch.get_num_threads()} threads")
    if args.layers == "unrolled":  # the weights held per layer, as Generator holds them (split once, here)
        cfg, ours_params = cfg.replace(scan_layers=False), unstack_layers(ours_params)
    both = args.layers == "both"
    unrolled_params = unstack_layers(ours_params) if both else None
    print(f"ours: layers {'scan and unrolled' if both else args.layers}")
    header = f"{'batch':>5} | {'ours prefill tok/s':>18} {'ours decode ms/step':>20} | " \
             + (f"{'unrolled prefill tok/s':>22} {'unrolled decode ms/step':>23} | " if both else "") + \
             f"{'HF prefill tok/s':>16} {'HF decode ms/step':>18} | {'speed-up':>8} | same tokens"
    print(header)
    print("-" * len(header))
    rs = np.random.RandomState(0)
    records = []
    for B in [int(b) for b in args.batches.split(",")]:
        tokens = jnp.asarray(rs.randint(2, cfg.real_vocab_size, (B, args.prompt)), jnp.int32)
        pre, step, toks = ours(cfg, ours_params, tokens, args.new, args.repeats)
        row = f"{B:>5} | {B * args.prompt / pre:>18,.0f} {step * 1e3:>20.2f} | "
        rec = {"preset": preset, "dtype": args.dtype, "int8": args.int8, "batch": B, "prompt": args.prompt,
               "new": args.new, "device": jax.devices()[0].device_kind, "ours_prefill_tok_s": B * args.prompt / pre,
               "ours_decode_ms_step": step * 1e3, "scan_layers": cfg.scan_layers}
        if both:
            upre, ustep, utoks = ours(cfg.replace(scan_layers=False), unrolled_params, tokens, args.new,
                                     args.repeats)
            # the same program in another order of operations: greedy paths may part after a near tie
            agree = float(np.mean(np.all(utoks[:, :16] == toks[:, :16], axis=1)))
            row += f"{B * args.prompt / upre:>22,.0f} {ustep * 1e3:>23.2f} | "
            rec.update(unrolled_prefill_tok_s=B * args.prompt / upre, unrolled_decode_ms_step=ustep * 1e3,
                       unrolled_rows_agree_16=agree)
        if args.no_hf:
            print(row + f"{'-':>16} {'-':>18} | {'-':>8} | -", flush=True)
        else:
            hpre, hstep, htoks = hf(cfg, params, tokens, args.new, args.repeats, args.dtype, device)
            # random weights give nearly flat logits, so the two libraries' rounding can part greedy paths
            same = np.mean(np.all(toks[:, :16] == htoks[:, :16], axis=1))
            print(row + f"{B * args.prompt / hpre:>16,.0f} {hstep * 1e3:>18.2f} | {hstep / step:>7.1f}x | "
                        f"{same:.0%} of rows agree on 16 tokens", flush=True)
            rec.update(hf_prefill_tok_s=B * args.prompt / hpre, hf_decode_ms_step=hstep * 1e3)
        records.append(rec)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    signal.alarm(0)


if __name__ == "__main__":
    main()
