"""`neox-jax generate`: complete prompts with a checkpoint (KV-cached decoding, neox_jax/generate.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .config import FLOAT_DTYPES, RUN_DTYPES
from .errors import UserError
from .jsonl import check_utf8, read_jsonl
from .values import seed_option


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="complete prompts with a checkpoint (greedy or sampled, KV-cached)",
        description="Generate text from a neox-jax checkpoint. Prompts come from --prompt, from --input (JSON "
                    "lines with \"prompt\" (text) or \"prompt_tokens\" (ids)), or interactively from standard "
                    "input (one prompt per line, tokens streamed as they are produced). Decoding stops at "
                    "the tokenizer's end-of-document token, at a --stop string, or after --max-new-tokens. "
                    "--output writes one JSON line per prompt: {\"prompt\", \"completion\", \"prompt_tokens\", "
                    "\"completion_tokens\", \"stop_reason\"}.")
    p.add_argument("ckpt", help="neox-jax checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (text)")
    src.add_argument("--input", help="IN.jsonl (or .jsonl.zst): one {\"prompt\": TEXT} or {\"prompt_tokens\": [ids]} "
                                     "per line")
    src.add_argument("--interactive", action="store_true", help="read prompts from standard input, stream tokens")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) means greedy (--top-k/--top-p need a temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=seed_option, default=0,
                   help="sampling seed, 0 to 2**32 - 1 (each prompt draws from its own stream)")
    p.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                   help="stop strings: the completion ends before the first one")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="float32",
                   help="parameter and compute dtype (default float32)")
    p.add_argument("--int8", action="store_true",
                   help="int8 matmul weights with per-channel scales (half the bytes of bf16; embedding, "
                        "LayerNorms and biases as loaded)")
    p.add_argument("--rotary-dtype", choices=FLOAT_DTYPES,
                   help="rotary table precision (default: the checkpoint's config)")
    p.add_argument("--tensor", type=int, default=1,
                   help="tensor-parallel devices: weights and KV cache split by heads/columns (default 1)")
    p.add_argument("--layers", choices=("scan", "unrolled"),
                   help="each decode step's layers in a lax.scan, or unrolled with the weights held per "
                        "layer (longer compile; 5-25%% faster per token on the development CPU, "
                        "docs/generate.md) (default: the checkpoint's model.scan_layers)")
    p.add_argument("--tokenizer", help="HF tokenizers JSON or sentencepiece .model "
                                       "(default: ../shared/data/20B_tokenizer.json)")
    p.add_argument("--output", help="OUT.jsonl (default: print)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(run=_run_generate)
    p.ignored_without("--overwrite", "--output")
    p.ignored_with("--batch-size", "--interactive")  # interactive prompts are decoded one at a time


def _read_prompts(path: str, tok) -> tuple[list[str | None], list[list[int]]]:
    p = Path(path)
    texts: list[str | None] = []
    ids: list[list[int]] = []
    for lineno, rec in read_jsonl(p):
        if not isinstance(rec, dict) or ("prompt" in rec) == ("prompt_tokens" in rec):
            raise UserError(f"{p}:{lineno}: expected an object with exactly one of 'prompt' or 'prompt_tokens'")
        if "prompt_tokens" in rec:
            t = rec["prompt_tokens"]
            if not isinstance(t, list) or not t or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
                raise UserError(f"{p}:{lineno}: 'prompt_tokens' must be a non-empty list of integers")
            texts.append(None)
            ids.append(t)
        else:
            if not isinstance(rec["prompt"], str) or not rec["prompt"]:
                raise UserError(f"{p}:{lineno}: 'prompt' must be a non-empty string")
            texts.append(rec["prompt"])
            ids.append(tok.encode(rec["prompt"]))
            if not ids[-1]:
                raise UserError(f"{p}:{lineno}: 'prompt' encodes to no tokens")
    if not ids:
        raise UserError(f"{p}: no prompts")
    return texts, ids


def _record(text, c) -> dict:
    return {"prompt": text, "completion": c.text, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "stop_reason": c.stop_reason}


def _run_generate(args):
    from .data.tokenizer import load_tokenizer
    from .generate import Sampling, load_generator

    if args.output and args.interactive:
        raise UserError("--output is not used with --interactive")
    if args.output:
        from .atomic import check_output

        check_output(args.output, args.overwrite, [("--input", args.input), ("CKPT", args.ckpt),
                                                   ("--tokenizer", args.tokenizer)])
    checks = (("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
               "a finite number >= 0"),
              ("--top-k", args.top_k, args.top_k >= 0, ">= 0"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
              ("--tensor", args.tensor, args.tensor >= 1, ">= 1"))
    for opt, value, ok, want in checks:
        if not ok:
            raise UserError(f"{opt} {value}: must be {want}")
    if args.temperature == 0:  # greedy decoding would ignore the sampling filters
        for opt, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0)):
            if value != off:
                raise UserError(f"{opt} {value}: samples only with --temperature > 0 (temperature 0 is greedy)")
    if args.temperature == 0 and "--seed" in args.typed:  # greedy decoding draws no random numbers
        raise UserError(f"--seed {args.seed}: has no effect with greedy decoding (--temperature 0)")
    if "" in args.stop:
        raise UserError("--stop '': an empty stop string (it would be found before any generated text)")
    for s in args.stop:  # text is compared as decoded: a stop string that is not UTF-8 could never match
        check_utf8(s, "--stop", from_bytes=True)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tok = load_tokenizer(args.tokenizer)
    if args.input:
        texts, prompts = _read_prompts(args.input, tok)
    elif args.prompt is not None:
        if not args.prompt:
            raise UserError("--prompt is empty")
        check_utf8(args.prompt, "--prompt", from_bytes=True)
        texts, prompts = [args.prompt], [tok.encode(args.prompt)]
    if args.input:
        from .checkpoint import read_config

        cfg = read_config(args.ckpt)
        vocab, context = cfg.vocab_size, cfg.max_position_embeddings
        for i, ids in enumerate(prompts):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise UserError(f"{args.input}: prompt {i}: token id {bad[0]} outside the model's vocabulary "
                                f"[0, {vocab})")
            if len(ids) + args.max_new_tokens > context:
                raise UserError(f"{args.input}: prompt {i}: {len(ids)} tokens + --max-new-tokens "
                                f"{args.max_new_tokens} exceed the model's context of {context} "
                                "(max_position_embeddings)")
    overrides = {"rotary_dtype": args.rotary_dtype} if args.rotary_dtype else {}
    if args.layers:
        overrides["scan_layers"] = args.layers == "scan"
    gen = load_generator(args.ckpt, dtype=args.dtype, tensor=args.tensor, tokenizer=tok, overrides=overrides,
                         int8=args.int8)
    stop_tokens = [] if args.ignore_eod or not tok.has_eod else [tok.eod_id]
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stop_tokens=stop_tokens,
              stop_strings=args.stop)
    if args.interactive:
        return _interactive(gen, tok, kw)
    results = gen.generate(prompts, batch_size=args.batch_size, progress=sys.stderr.isatty(), **kw)
    records = [_record(t, c) for t, c in zip(texts, results)]
    if args.output:
        from .atomic import Replacement

        out = Path(args.output)
        with Replacement([out], overwrite=args.overwrite) as rep:
            with open(rep.tmp(), "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            rep.commit()
        n = sum(len(r["completion_tokens"]) for r in records)
        print(f"wrote {out} ({len(records)} prompts, {n} generated tokens)", file=sys.stderr)
    elif args.prompt is not None:
        print(records[0]["completion"])
    else:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))


class _Streamer:
    """Prints a completion's text as tokens arrive (holding back an unfinished UTF-8 character and
    anything from the first stop string on)."""

    def __init__(self, tok, stop_strings):
        self.tok, self.stop = tok, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def __call__(self, _prompt: int, token: int) -> None:
        if self.stopped:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text, self.stopped = text[: min(hits)], True
        elif text.endswith("\ufffd"):
            return
        else:  # a stop string may be starting: hold back its longest matching prefix
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if len(text) > self.shown:
            sys.stdout.write(text[self.shown:])
            sys.stdout.flush()
            self.shown = len(text)


def _stdin_line() -> str:
    """The next line of standard input ('' at its end), read as bytes where it has them: a line that is
    not UTF-8 comes back with its bad bytes as PEP 383 escapes (for `check_utf8` to name), whatever the
    locale's error handler, and never stops the reading of the lines after it."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes below it (io.StringIO)
        return sys.stdin.readline()
    return raw.readline().decode("utf-8", "surrogateescape")


def _interactive(gen, tok, kw):
    tty = sys.stdin.isatty()
    seed = kw.pop("seed")
    for turn in range(sys.maxsize):
        kw["seed"] = seed + turn  # a new stream of random numbers per prompt
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = _stdin_line()
        if not line:
            break
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        streamer = _Streamer(tok, kw["stop_strings"])
        try:
            ids = tok.encode(check_utf8(prompt, "prompt 0", from_bytes=True))
            result = gen.generate([ids], batch_size=1, on_token=streamer, **kw)[0]
        except UserError as e:  # a prompt that is not UTF-8 or too long, ...: say so, keep the session
            why = str(e).removeprefix("prompt 0: ")
            print(f"neox-jax: skipped input line {turn + 1}: {why}", file=sys.stderr)
            continue
        rest = (result.text or "")[streamer.shown:]  # anything held back and not cut by a stop string
        sys.stdout.write(rest + "\n")
        sys.stdout.flush()
