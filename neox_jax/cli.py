"""`neox-jax` command line (also `python -m neox_jax`).

Each command registers its own parser; heavy imports (jax, torch) happen inside `run`, so
`--help` is fast.  Bad input raises `UserError` (or OSError), reported as one line
`neox-jax: error: ...` with exit status 2 and no traceback (`--debug` shows it); so is a command line
argparse cannot parse (`Parser`: the line names the command, no usage block).  SIGTERM is
handled as SIGINT is: it raises `Terminated` in the main thread, so every writer's cleanup runs
(temporaries removed, DST untouched); the exit status is then 143 (130 for SIGINT).  One that
Python drops (raised inside a garbage-collector callback, JAX has one) is sent again (`_redeliver`).
A command may return its own status (`train` stopped by a signal after its checkpoint: 143 or 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import RUN_DTYPES
from .errors import Terminated, UsageError, UserError
from .values import seed_option

log = logging.getLogger(__name__)


def _redeliver(hook):
    """A `sys.unraisablehook`: a KeyboardInterrupt or Terminated that Python had to drop (raised while a
    garbage-collector or weakref callback or a finalizer ran; JAX has a gc callback) is sent again to
    the main thread as its signal, 50 ms later, instead of being printed as 'Exception ignored' while
    the command goes on; anything else goes to `hook`."""
    def unraisable(u):
        signum = {KeyboardInterrupt: signal.SIGINT, Terminated: signal.SIGTERM}.get(u.exc_type)
        if signum is None:
            return hook(u)
        t = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signum))
        t.daemon = True
        t.start()
    return unraisable


def _on_sigterm(signum, frame):
    raise Terminated()


class Abrupt(int):
    """The exit status of a command that a signal cut short (130, 143): `entry` then leaves without
    interpreter finalization.  A command that stopped in good order after a signal (`train`: its
    checkpoint committed) returns a plain 130/143 and finalizes as after success."""


class Parser(argparse.ArgumentParser):
    """The parser of `neox-jax` and (argparse makes subparsers of their parent's class) of every command.

    A usage error (unknown option, missing argument, bad value) raises `UsageError`, reported by `main` as
    one line that names the command, `neox-jax: error: data order: argument --seed: invalid int value: 'x'
    (see neox-jax data order --help)`, instead of argparse's usage block.  An unrecognized argument is
    reported by the command that met it (argparse would hand it to the top-level parser, which cannot
    name the command): no command of this CLI passes arguments through.

    A command declares the options that would have no effect together (`ignored_with`) or alone
    (`ignored_without`); `main` refuses them, as usage errors, when the user typed them
    (`typed_options`: an option typed at its default value counts, an untyped one never does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = None  # the subparsers action, when this parser has commands
        self._ignored: list[tuple[str, tuple[str, ...], bool]] = []

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def ignored_with(self, option: str, other: str) -> None:
        """Refuse `option` typed together with `other` typed: one of them would have no effect."""
        self._ignored.append((option, (other,), True))

    def ignored_without(self, option: str, *needed: str) -> None:
        """Refuse `option` typed when none of `needed` is typed: it would have no effect."""
        self._ignored.append((option, needed, False))

    def chain(self, args: argparse.Namespace):
        """This parser and the parsers of the command (and subcommand) `args` chose."""
        p = self
        while p is not None:
            yield p
            p = p.commands.choices[getattr(args, p.commands.dest)] if p.commands else None

    def check_ignored(self, typed: frozenset[str]) -> None:
        for option, others, together in self._ignored:
            if option not in typed:
                continue
            if together and others[0] in typed:
                self.error(f"{option} has no effect with {others[0]}")
            if not together and not typed & set(others):
                names = ", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else others[0]
                self.error(f"{option} has no effect without {names}")

    def error(self, message: str):
        command = self.prog.removeprefix("neox-jax").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


# ----------------------------------------------------------------------------- init


def _add_init(sub):
    p = sub.add_parser("init", help="write a randomly initialised checkpoint",
                       description="Initialise a model from a YAML preset (or preset name) and save it "
                                   "as a neox-jax checkpoint directory.")
    p.add_argument("config", help="YAML preset path or name (e.g. configs/tiny.yaml, pythia-70m)")
    p.add_argument("dst", help="checkpoint directory to create")
    p.add_argument("--seed", type=seed_option, default=0,
                   help="random seed of the initialisation, 0 to 2**32 - 1 (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.num_layers=4 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.set_defaults(run=_run_init)


def _run_init(args):
    from .checkpoint import check_destination, save_params
    from .config import load_config

    cfg = load_config(args.config, args.set)
    check_destination(args.dst, args.overwrite)  # before spending time on initialisation
    from .model import init_params

    log.info("initialising %s parameters (seed %d)", f"{cfg.num_params():,}", args.seed)
    params = init_params(cfg, args.seed)
    path = save_params(args.dst, cfg, params, overwrite=args.overwrite, seed=args.seed)
    print(f"wrote {path} ({cfg.num_params():,} parameters)")


# ----------------------------------------------------------------------------- score


def _add_score(sub):
    p = sub.add_parser(
        "score", help="per-token log-probabilities of documents (perplexity summary)",
        description="Score documents with a checkpoint. Each input line is {\"text\": ...} (needs a "
                    "tokenizer) or {\"tokens\": [...]}; a .txt input is one document. Each output line is "
                    "{\"tokens\", \"logprobs\", \"sum\", \"count\"} with count = len(tokens) - 1. Inputs longer "
                    "than the context are scored in rolling windows (lm-eval loglikelihood_rolling).")
    p.add_argument("ckpt", help="neox-jax checkpoint directory")
    p.add_argument("--input", required=True, help="IN.jsonl or IN.jsonl.zst (or a .txt file = one document)")
    p.add_argument("--output", help="OUT.jsonl (per-document scores)")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="float32", help="compute dtype")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--tokenizer", help="HF tokenizers JSON or sentencepiece .model "
                                       "(default: ../shared/data/20B_tokenizer.json)")
    p.add_argument("--context", type=int, help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--verify", action="store_true",
                   help="check every tensor against the checkpoint's checksums.json before scoring")
    p.set_defaults(run=_run_score)
    p.ignored_without("--overwrite", "--output")


def _read_documents(path: str, tokenizer_path: str | None):
    from .jsonl import read_jsonl, read_text

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: input file not found")
    texts: list[str | None] = []
    tokens: list[list[int] | None] = []
    if p.suffix == ".txt":
        texts.append(read_text(p))
        tokens.append(None)
    else:
        for lineno, rec in read_jsonl(p):
            if not isinstance(rec, dict) or ("text" in rec) == ("tokens" in rec):
                raise UserError(f"{p}:{lineno}: expected an object with exactly one of 'text' or 'tokens'")
            if "tokens" in rec:
                t = rec["tokens"]
                if not isinstance(t, list) or not all(isinstance(x, int) for x in t):
                    raise UserError(f"{p}:{lineno}: 'tokens' must be a list of integers")
                tokens.append(t)
                texts.append(None)
            else:
                if not isinstance(rec["text"], str):
                    raise UserError(f"{p}:{lineno}: 'text' must be a string")
                texts.append(rec["text"])
                tokens.append(None)
    # bits per byte only when every document came as text
    n_bytes: int | None = 0 if all(t is not None for t in texts) else None
    if any(t is not None for t in texts):
        from .data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        for i, t in enumerate(texts):
            if t is not None:
                tokens[i] = tok.encode(t)
                if n_bytes is not None:
                    n_bytes += len(t.encode("utf-8"))
    return tokens, n_bytes


def _run_score(args):
    from .checkpoint import load_params
    from .evaluate import score_documents, summarize, write_scores
    from .model import DTYPES, inference_params

    from .checkpoint import read_config
    from .evaluate import check_batch_size, check_scorable, check_window

    if args.output:
        from .atomic import check_output

        check_output(args.output, args.overwrite, [("--input", args.input), ("CKPT", args.ckpt),
                                                   ("--tokenizer", args.tokenizer)])
    check_batch_size(args.batch_size)
    if not Path(args.input).exists():
        raise UserError(f"{args.input}: input file not found")
    if args.context is not None and args.context < 1:
        raise UserError(f"--context {args.context}: must be a positive number of tokens")
    cfg = read_config(args.ckpt)  # options checked against the model before any work
    window = check_window(args.context, cfg)
    docs, n_bytes = _read_documents(args.input, args.tokenizer)
    check_scorable(docs, args.input)
    cfg, params = load_params(args.ckpt, verify=args.verify)
    narrower = DTYPES[args.dtype].itemsize < DTYPES[cfg.param_dtype].itemsize
    cfg = cfg.replace(compute_dtype=args.dtype)
    if narrower:  # e.g. bf16 scoring of float32 weights: hold them in bf16, cast once (never widened)
        params = inference_params(cfg, params)
    lps = score_documents(cfg, params, docs, batch_size=args.batch_size, window=window,
                          progress=sys.stderr.isatty(), source=args.input)
    if args.output:
        from .atomic import Replacement

        with Replacement([args.output], overwrite=True) as rep:
            write_scores(rep.tmp(), docs, lps)
            rep.commit()
    summary = summarize(lps, n_bytes)
    print(json.dumps({"summary": summary}))
    print(f"perplexity {summary['perplexity']:.4f} over {summary['tokens_scored']} tokens "
          f"in {summary['documents']} documents", file=sys.stderr)


# ----------------------------------------------------------------------------- main


def typed_options(argv: list[str], args: argparse.Namespace) -> frozenset[str]:
    """The options the user typed, by their long name (`--seed`), whatever their values: `argv` parsed
    again by a parser whose options of the chosen command have no defaults, so that only the typed ones
    reach the namespace.  `args` (the first parse) says which command was chosen."""
    parser = build_parser()
    chain = list(parser.chain(args))
    options = [a for p in chain for a in p._actions if a.option_strings]  # argparse lists them nowhere public
    for a in options:
        a.default = argparse.SUPPRESS
    ns = parser.parse_args(argv)
    # --resume and --no-resume share a dest: the one typed is the one whose constant is there
    return frozenset(max(a.option_strings, key=len) for a in options
                     if hasattr(ns, a.dest) and (a.const is None or getattr(ns, a.dest) == a.const))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="neox-jax",
        description="GPT-NeoX-20B and Pythia in JAX: init, train, plan, score, generate, eval, convert, inspect, diff, export, data tools.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_init(sub)
    _add_score(sub)
    from .convert import cli as convert_cli
    from .data import cli as data_cli
    from . import generate_cli
    from .eval import cli as eval_cli
    from . import export
    from .train import cli as train_cli
    from .train import plan as plan_cli

    train_cli.register(sub)
    plan_cli.register(sub)
    convert_cli.register(sub)
    data_cli.register(sub)
    generate_cli.register(sub)
    eval_cli.register(sub)
    export.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        # an option that would have no effect (its command's ignored_with/ignored_without) is refused
        args.typed = typed_options(argv, args)
        for p in parser.chain(args):
            p.check_ignored(args.typed)
    except UsageError as e:
        print(f"neox-jax: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "tensorstore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    old_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver(old_hook)
    try:
        code = args.run(args) or 0
    except BrokenPipeError:  # the reader of our output left (`neox-jax data order ... | head`): quietly,
        # as a pipeline's other commands do (141 = 128 + SIGPIPE); stdout's last flush goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UserError, OSError) as e:
        if args.debug:
            raise
        if isinstance(e, UserError):
            msg = str(e)
        else:  # an OSError names its file when it has one (never an empty name before the colon)
            name = getattr(e, "filename", None)
            msg = f"{name}: {e.strerror or e}" if name else str(e.strerror or e)
        print(f"neox-jax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neox-jax: interrupted", file=sys.stderr)
        return Abrupt(130)
    except Terminated:
        print("neox-jax: terminated", file=sys.stderr)
        return Abrupt(143)
    finally:
        sys.unraisablehook = old_hook
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return code


def entry() -> None:
    """The `neox-jax` executable (and `python -m neox_jax`): `main`, then the process exits with its
    status.  After an interrupt (130) or SIGTERM (143) it leaves without interpreter finalization:
    the signal can land while XLA still runs work on its own threads (an asynchronous dispatch, a
    compile), and tearing the runtime down under them crashed the process with SIGSEGV in most
    tries (9 of 12 for `init` at 4.5 s).  Every command's cleanup has run by then (the temporaries
    are gone, the one-line message printed), so nothing that finalization would do is lost.  A
    SIGTERM landing while `main` restores the old handlers is reported the same way."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("neox-jax: interrupted", file=sys.stderr)
        code = Abrupt(130)
    except Terminated:
        print("neox-jax: terminated", file=sys.stderr)
        code = Abrupt(143)
    if isinstance(code, Abrupt):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
