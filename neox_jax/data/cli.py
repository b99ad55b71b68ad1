"""`neox-jax data` commands: preprocess, order, train-tokenizer.

Heavy imports happen inside the `_run_*` functions so `--help` stays fast.  Outputs are written under
temporary names and renamed at the end; existing outputs are refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from ..values import check_split, check_weights, seed_option


def register(sub) -> None:
    """Add the `data` commands to the `neox-jax` parser."""
    p = sub.add_parser("data", help="NeoX indexed datasets: preprocess, sample order, tokenizers",
                       description="Data tools: tokenise corpora into GPT-NeoX .bin/.idx datasets, replay "
                                   "GPT-NeoX's exact training-sample order, train tokenizers.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    _add_preprocess(data_sub)
    _add_order(data_sub)
    _add_train_tokenizer(data_sub)


def _add_reader_args(p) -> None:
    p.add_argument("--jsonl-key", default="text", help="JSON key holding the document text (default: text)")
    p.add_argument("--txt-mode", choices=["file", "blank-lines"], default="file",
                   help="a .txt input is one document (file, GPT-NeoX's rule) or one document per "
                        "block of lines separated by blank lines (blank-lines)")


def _check_reader_args(args, jsonl_options: tuple[str, ...]) -> None:
    """A reader option typed for a kind of input that none of INPUT is would have no effect: refused."""
    from .preprocess import input_kind

    kinds = {input_kind(Path(p)) for p in args.inputs}
    if "--txt-mode" in args.typed and ".txt" not in kinds:
        raise UserError("--txt-mode applies to .txt inputs, and no INPUT is a .txt file")
    for option in jsonl_options:
        if option in args.typed and not kinds & {".jsonl", ".jsonl.zst"}:
            raise UserError(f"{option} applies to .jsonl/.jsonl.zst inputs, and every INPUT is a .txt file")


# ----------------------------------------------------------------------------- preprocess


def _add_preprocess(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="tokenise .jsonl/.jsonl.zst/.txt into a GPT-NeoX .bin/.idx dataset",
        description="Tokenise documents into OUTPUT_PREFIX_{key}_document.bin/.idx, byte-identical to "
                    "GPT-NeoX's tools/preprocess_data.py for the same input and tokenizer: one item per "
                    "document, empty documents skipped, text used as is, uint16 when the vocabulary has "
                    "fewer than 65500 ids (else int32). JSONL lines that are not UTF-8 or not JSON are "
                    "skipped and counted (fatal with --strict).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.zst or .txt files, in order")
    p.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX_{key}_document.bin and .idx (GPT-NeoX's naming)")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizers JSON (e.g. ../shared/data/20B_tokenizer.json) or sentencepiece .model")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token (<|endoftext|>) "
                                                             "to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto",
                   help="token dtype (auto: GPT-NeoX's rule)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad JSONL line")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_reader_args(p)
    p.set_defaults(run=_run_preprocess)


def _run_preprocess(args) -> None:
    from .preprocess import preprocess

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    _check_reader_args(args, ("--jsonl-key", "--strict"))
    res = preprocess(args.inputs, args.output_prefix, args.tokenizer, append_eod=args.append_eod,
                     workers=args.workers, key=args.jsonl_key, txt_mode=args.txt_mode, strict=args.strict,
                     dtype=args.dtype, overwrite=args.overwrite)
    st = res.stats
    print(f"wrote {res.prefix}.bin/.idx: {res.documents} documents, {res.tokens} tokens ({res.dtype}), "
          f"{res.tokens_per_second:,.0f} tokens/s; skipped {st.bad_lines} bad lines, "
          f"{st.empty} empty documents")


# ----------------------------------------------------------------------------- order


def _add_order(sub) -> None:
    p = sub.add_parser(
        "order", help="which documents and tokens fed each sample of given training steps",
        description="Rebuild GPT-NeoX's (Pythia-era) training-sample order and report, for steps A:B, "
                    "each sample's position in the run, its index after shuffling, and the documents "
                    "and token offsets it was cut from. Step s uses dataset items [s*batch, (s+1)*batch). "
                    "Reads GPT-NeoX's cached *_indexmap_*.npy files when present.")
    p.add_argument("--data-prefix", nargs="+", required=True, metavar="P",
                   help="indexed dataset prefix(es) (P.bin + P.idx); several = NeoX train-data-paths blend")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample, S (default 2048)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-samples", help="GPT2Dataset num_samples, comma-separated per prefix "
                                         "(Pythia: 147164160 = ceil(143000*1024*1.005))")
    n.add_argument("--train-iters", type=int, help="derive num_samples as GPT-NeoX does: "
                                                   "ceil(iters*batch*weight*1.005) per prefix, or "
                                                   "iters*batch with --split")
    p.add_argument("--seed", type=seed_option, default=1234,
                   help="GPT-NeoX's data seed, 0 to 2**32 - 1 (default 1234, Pythia's)")
    p.add_argument("--batch", type=int, default=1024, help="global batch size (samples per step)")
    p.add_argument("--steps", required=True, help="A:B (steps A..B-1) or a single step A")
    p.add_argument("--weights", type=float, nargs="+", help="blend weights, one per prefix (default equal)")
    p.add_argument("--split", help="GPT-NeoX-20B's data-path route: train split of one prefix, e.g. 995,4,1")
    p.add_argument("--preshuffled", action="store_true",
                   help="P is a pre-shuffled Pythia dataset: item i is sample i (no index maps)")
    p.add_argument("--output", help="OUT.jsonl: one line per sample with its seq_length+1 tokens")
    p.add_argument("--decode", action="store_true", help="add each sample's text to --output lines")
    p.add_argument("--tokenizer", help="tokenizer for --decode (default: ../shared/data/20B_tokenizer.json)")
    p.add_argument("--no-cache", action="store_true", help="ignore GPT-NeoX's cached index maps")
    p.add_argument("--save-index-maps", action="store_true",
                   help="write the index maps next to the data under GPT-NeoX's cache names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(run=_run_order)
    p.ignored_without("--overwrite", "--output")
    p.ignored_without("--decode", "--output")  # it adds the text to the --output lines
    p.ignored_without("--tokenizer", "--decode")
    for option in ("--seed", "--no-cache", "--save-index-maps"):  # a pre-shuffled dataset has no index maps
        p.ignored_with(option, "--preshuffled")
    p.ignored_with("--weights", "--split")  # the data-path route has one dataset


def _parse_steps(text: str) -> range:
    try:
        if ":" in text:
            a, b = (int(x) for x in text.split(":"))
        else:
            a = int(text)
            b = a + 1
    except ValueError:
        raise UserError(f"--steps {text!r}: expected A:B or A (integers)") from None
    if a < 0 or b <= a:
        raise UserError(f"--steps {text!r}: need 0 <= A < B")
    return range(a, b)


def _build_order_dataset(args, limit: int):
    from .order import PreshuffledDataset, build_train_dataset

    if args.weights is not None:
        check_weights(args.weights, "--weights")
    if args.split is not None:
        check_split(args.split, "--split")
    if args.weights is not None and len(args.data_prefix) == len(args.weights) == 1 and not args.preshuffled:
        raise UserError(f"--weights {' '.join(map(str, args.weights))}: has no effect with one --data-prefix "
                        "(a blend of one dataset)")
    if args.preshuffled:
        if len(args.data_prefix) != 1 or args.split or args.weights or args.num_samples or args.train_iters:
            raise UserError("--preshuffled takes one --data-prefix and no --split/--weights/--num-samples/"
                            "--train-iters (item i is sample i)")
        return PreshuffledDataset(args.data_prefix[0], args.seq_length)
    if args.num_samples is None and args.train_iters is None:
        raise UserError("give --num-samples or --train-iters (or --preshuffled)")
    counts = None
    if args.num_samples is not None:
        try:
            counts = [int(x) for x in args.num_samples.split(",")]
        except ValueError:
            raise UserError(f"--num-samples {args.num_samples!r}: expected integers") from None
        if any(c < 1 for c in counts):
            raise UserError(f"--num-samples {args.num_samples}: every count must be >= 1")
    if args.train_iters is not None and args.train_iters < 1:
        raise UserError(f"--train-iters {args.train_iters}: must be >= 1")
    return build_train_dataset(args.data_prefix, args.seq_length, args.seed, num_samples=counts,
                               train_iters=args.train_iters, batch=args.batch, weights=args.weights,
                               split=args.split, use_cache=not args.no_cache,
                               save_cache=args.save_index_maps, limit=limit)


def _run_order(args) -> None:
    steps = _parse_steps(args.steps)
    out = Path(args.output) if args.output else None
    if out is not None:
        from ..atomic import check_output
        from .indexed import prefix_inputs

        check_output(out, args.overwrite, [i for p in args.data_prefix for i in prefix_inputs(p)])
    if args.batch <= 0 or args.seq_length < 2:
        raise UserError("--batch must be positive and --seq-length at least 2")
    ds = _build_order_dataset(args, limit=steps.stop * args.batch)
    if steps.stop * args.batch > len(ds):
        raise UserError(f"steps up to {steps.stop - 1} need {steps.stop * args.batch} samples; the "
                        f"dataset has {len(ds)} ({len(ds) // args.batch} full steps)")
    tok = None
    if args.decode:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    from tqdm import tqdm

    indices = range(steps.start * args.batch, steps.stop * args.batch)
    bar = tqdm(indices, desc="samples", unit="sample", disable=not sys.stderr.isatty() or out is None)
    if out is None:
        for i in bar:
            d = ds.describe(i)
            where = "" if d["doc_ids"] is None else " docs " + " ".join(
                f"{doc}[{a}:{b}]" for doc, (a, b) in zip(d["doc_ids"], d["offsets"]))
            blend = f" dataset {d['dataset']}" if "dataset" in d else ""
            print(f"step {i // args.batch} index {i}{blend} sample {d['sample']}{where}")
        return
    from ..atomic import Replacement

    with Replacement([out], overwrite=True) as rep:
        with open(rep.tmp(), "w", encoding="utf-8") as f:
            for i in bar:
                tokens = ds[i]
                rec = {"step": i // args.batch, "index": i, **ds.describe(i), "tokens": tokens.tolist()}
                if tok is not None:
                    rec["text"] = tok.decode(tokens)
                f.write(json.dumps(rec) + "\n")
        rep.commit()
    print(f"wrote {out}: {len(indices)} samples of steps {steps.start}..{steps.stop - 1}")


# ----------------------------------------------------------------------------- train-tokenizer


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser(
        "train-tokenizer", help="train a byte-level BPE (HF JSON) or sentencepiece tokenizer",
        description="Train a tokenizer on .jsonl/.jsonl.zst/.txt inputs. OUTPUT ending in .json: byte-level "
                    "BPE built like GPT-NeoX's 20B tokenizer (<|endoftext|>=0, <|padding|>=1). OUTPUT "
                    "ending in .model: sentencepiece (eos <|endoftext|>=0, pad 1, unk 2, byte fallback).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.zst or .txt training text")
    p.add_argument("--output", required=True, help="OUT.json (BPE) or OUT.model (sentencepiece)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece model type (default bpe)")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    _add_reader_args(p)
    p.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args) -> None:
    from .tokenizer import load_tokenizer
    from .train_tokenizer import train_bpe, train_sentencepiece

    out = Path(args.output)
    # each option belongs to one trainer: given for the other, it would have no effect
    for option, suffix in (("--model-type", ".json"), ("--min-frequency", ".model")):
        if option in args.typed and out.suffix == suffix:
            kind = "BPE (.json)" if suffix == ".json" else "sentencepiece (.model)"
            raise UserError(f"{option} has no effect with a {kind} --output {out}")
    _check_reader_args(args, ("--jsonl-key",))
    if out.suffix == ".json":
        path = train_bpe(args.inputs, out, args.vocab_size, min_frequency=args.min_frequency,
                         key=args.jsonl_key, txt_mode=args.txt_mode, overwrite=args.overwrite,
                         progress=sys.stderr.isatty())
    elif out.suffix == ".model":
        path = train_sentencepiece(args.inputs, out, args.vocab_size, model_type=args.model_type,
                                   key=args.jsonl_key, txt_mode=args.txt_mode, overwrite=args.overwrite)
    else:
        raise UserError(f"{out}: --output must end in .json (BPE) or .model (sentencepiece)")
    print(f"wrote {path} ({load_tokenizer(path).vocab_size} tokens)")
