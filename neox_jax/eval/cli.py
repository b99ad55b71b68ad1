"""`neox-jax eval`: lm-eval tasks through the `neox-jax` backend and the built-in evaluators."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from ..config import RUN_DTYPES
from ..errors import UserError, one_line


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: lm-eval tasks, LAMBADA accuracy, perplexity",
        description="Evaluate a neox-jax checkpoint. --tasks runs lm-evaluation-harness tasks (needs the eval "
                    "extra, `pip install neox-jax[eval]`, and the tasks' datasets, or local task YAMLs under "
                    "--include-path) through the `neox-jax` backend. Without the harness: --lambada FILE.jsonl "
                    "(last-word accuracy and perplexity, lm-eval's lambada_openai definition), --perplexity "
                    "FILE.jsonl|.txt (per-token perplexity, as `score`) and --data-prefix PREFIX (perplexity of an "
                    "indexed .bin/.idx dataset, optionally one part of a GPT-NeoX --split). The output JSON "
                    "holds every number and the configuration that produced it.")
    p.add_argument("ckpt", help="neox-jax checkpoint directory")
    p.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. lambada_openai,piqa")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: each task's)")
    p.add_argument("--limit", type=float, help="lm-eval: at most this many documents per task (testing only)")
    p.add_argument("--log-samples", action="store_true", help="keep lm-eval's per-document records in the output")
    p.add_argument("--lambada", metavar="FILE.jsonl", help="LAMBADA-format JSONL ({\"text\": ...} per line; .jsonl.zst too)")
    p.add_argument("--perplexity", metavar="FILE", help="JSONL (or .jsonl.zst) of {\"text\"} / {\"tokens\"}, or a .txt document")
    p.add_argument("--data-prefix", help="indexed dataset PREFIX (PREFIX.bin + PREFIX.idx)")
    p.add_argument("--split", help="GPT-NeoX split weights, e.g. 969,30,1 (with --data-prefix)")
    p.add_argument("--split-part", choices=["train", "valid", "test"],
                   help="which part of --split (default valid)")
    p.add_argument("--seq-length", type=int, help="--data-prefix sample length (default: the model's context)")
    p.add_argument("--max-samples", type=int, help="--data-prefix: score at most this many samples")
    p.add_argument("--context", type=int, help="window for --lambada/--perplexity and lm-eval max_length "
                                               "(default: the model's max_position_embeddings)")
    p.add_argument("--batch-size", type=int, default=8, help="requests or windows scored together (default 8)")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="float32", help="parameter and compute dtype")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices (default 1)")
    p.add_argument("--int8", action="store_true", help="int8 matmul weights (as generate --int8): to measure what "
                                                       "quantization costs on a task")
    p.add_argument("--seed", type=int, default=0, help="seed for tasks that sample")
    p.add_argument("--tokenizer", help="HF tokenizers JSON or sentencepiece .model "
                                       "(default: ../shared/data/20B_tokenizer.json)")
    p.add_argument("--output", required=True, help="results JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(run=_run_eval)
    p.ignored_without("--seed", "--tasks")  # the built-in evaluations draw no random numbers
    p.ignored_without("--context", "--tasks", "--lambada", "--perplexity")  # --data-prefix uses --seq-length
    p.ignored_without("--tokenizer", "--tasks", "--lambada", "--perplexity")  # --data-prefix holds token ids
    for option in ("--split", "--seq-length", "--max-samples"):  # options of the --data-prefix evaluation
        p.ignored_without(option, "--data-prefix")
    p.ignored_without("--split-part", "--split")
    for option in ("--num-fewshot", "--limit", "--log-samples", "--include-path"):  # of lm-eval's tasks
        p.ignored_without(option, "--tasks")


def _run_eval(args):
    from ..data.tokenizer import load_tokenizer
    from ..generate import load_generator, mesh_context
    from . import builtin

    from ..atomic import check_output
    from ..data.indexed import prefix_inputs

    out = check_output(args.output, args.overwrite,
                       [("--lambada", args.lambada), ("--perplexity", args.perplexity), ("CKPT", args.ckpt),
                        ("--tokenizer", args.tokenizer), ("--include-path", args.include_path),
                        *(prefix_inputs(args.data_prefix) if args.data_prefix else [])])
    args.split_part = args.split_part or "valid"
    if not (args.tasks or args.lambada or args.perplexity or args.data_prefix):
        raise UserError("nothing to evaluate: give --tasks, --lambada, --perplexity and/or --data-prefix")
    if args.tasks is not None and not _tasks(args):
        raise UserError(f"--tasks {args.tasks!r}: no task name (comma-separated lm-eval task names)")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: not a directory (of lm-eval task YAMLs)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    for opt in ("context", "seq_length", "max_samples"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise UserError(f"--{opt.replace('_', '-')} {v}: must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit {args.limit}: must be positive")
    if args.tensor < 1:
        raise UserError(f"--tensor {args.tensor}: must be >= 1")
    for name in ("lambada", "perplexity", "include_path"):
        path = getattr(args, name)
        if path and not Path(path).exists():
            raise UserError(f"{path}: {'directory' if name == 'include_path' else 'input file'} not found")
        if path and name != "include_path" and Path(path).is_dir():
            raise UserError(f"{path}: is a directory (--{name} takes a file)")
    if args.data_prefix:
        from ..data.indexed import IndexedDataset

        IndexedDataset(args.data_prefix)  # a missing or broken dataset fails before the model loads
        if args.split is not None:
            from ..values import check_split

            check_split(args.split, "--split")
    from ..checkpoint import read_config
    from ..evaluate import check_window

    model_cfg = read_config(args.ckpt)  # options checked against the model before it loads
    check_window(args.context, model_cfg)
    if args.seq_length is not None:
        check_window(args.seq_length, model_cfg, "--seq-length")
    # --perplexity's documents are read (and refused when there is nothing to score) before the model loads
    documents = builtin.perplexity_documents(args.perplexity, args.tokenizer) if args.perplexity else None
    harness = manager = None
    if args.tasks:
        try:
            from . import harness
        except ImportError as e:
            raise UserError(f"--tasks needs lm-evaluation-harness: pip install 'neox-jax[eval]' ({e})") from None
        manager = _task_manager(args)
    tok = load_tokenizer(args.tokenizer)
    gen = load_generator(args.ckpt, dtype=args.dtype, tensor=args.tensor, tokenizer=tok, int8=args.int8)
    cfg, params = gen.cfg, gen.params
    progress = sys.stderr.isatty()
    results: dict = {}
    started = time.time()
    with mesh_context(gen.mesh):
        if args.lambada:
            results["lambada"] = builtin.lambada(cfg, params, tok, args.lambada, batch_size=args.batch_size,
                                                 window=args.context, progress=progress)
        if args.perplexity:
            results["perplexity"] = builtin.document_perplexity(cfg, params, args.perplexity, args.tokenizer,
                                                                batch_size=args.batch_size, window=args.context,
                                                                progress=progress, documents=documents)
        if args.data_prefix:
            results["indexed_perplexity"] = builtin.indexed_perplexity(
                cfg, params, args.data_prefix, split=args.split, part=args.split_part, seq_length=args.seq_length,
                max_samples=args.max_samples, batch_size=args.batch_size, progress=progress)
    if harness is not None:
        results["lm_eval"] = _run_harness(args, harness, manager, gen)
    record = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "results": results,
        "config": {
            "model": cfg.to_dict(),
            "args": {k: v for k, v in vars(args).items() if k not in ("run", "overwrite", "debug", "quiet", "typed")},
            "tokenizer": tok.path,
            "seconds": round(time.time() - started, 3),
        },
    }
    record["config"]["versions"] = _versions()
    from ..atomic import Replacement

    with Replacement([out], overwrite=args.overwrite) as rep:
        rep.tmp().write_text(json.dumps(record, indent=2, default=str) + "\n")
        rep.commit()
    for name, r in results.items():
        if name == "lm_eval":
            for task, metrics in r["results"].items():
                shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
                print(f"{task}: {json.dumps(shown)}", file=sys.stderr)
        else:
            shown = {k: r[k] for k in ("accuracy", "perplexity") if k in r}
            print(f"{name}: {json.dumps(shown)}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("neox-jax", "jax", "lm_eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _task_manager(args):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in _tasks(args) if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task(s) {unknown}"
                        + ("" if args.include_path else " (local task YAMLs go under --include-path)"))
    return manager


def _raised_in_neox_jax(e: BaseException) -> bool:
    """Whether a frame of neox_jax (the backend lm-eval calls) is among those `e` went through below
    `_run_harness`: then it is our error, reported as such, not a task's."""
    package = Path(__file__).resolve().parents[1]
    tb = e.__traceback__.tb_next if e.__traceback__ else None
    while tb is not None:
        if package in Path(tb.tb_frame.f_code.co_filename).resolve().parents:
            return True
        tb = tb.tb_next
    return False


def _tasks(args) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def _git_hash_quietly() -> str | None:
    """lm-eval's `get_git_commit_hash` runs `git describe --always` with git's stderr left on ours:
    outside a git repository every `eval --tasks` printed "fatal: not a git repository".  The same
    question, with git's stderr dropped (the hash is not in our results; lm-eval's own are kept)."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def _quiet_git():
    import lm_eval.evaluator as ev

    old = getattr(ev, "get_git_commit_hash", None)
    if old is None:  # another lm-eval layout: nothing to quiet
        yield
        return
    ev.get_git_commit_hash = _git_hash_quietly
    try:
        yield
    finally:
        ev.get_git_commit_hash = old


def _run_harness(args, harness, manager, gen) -> dict:
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    tasks = _tasks(args)
    lm = harness.NeoxJaxLM(generator=gen, batch_size=args.batch_size, max_length=args.context, seed=args.seed)
    lm.checkpoint = args.ckpt
    try:
        with _quiet_git():
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=manager, log_samples=args.log_samples,
                                          random_seed=args.seed, numpy_random_seed=args.seed,
                                          torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a task lm-eval cannot build or run: one line; our own bugs pass
        if _raised_in_neox_jax(e):
            raise
        raise UserError(f"--tasks {','.join(tasks)}: lm-eval stopped ({one_line(e)})") from None
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "configs", "samples")
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=handle_non_serializable))
