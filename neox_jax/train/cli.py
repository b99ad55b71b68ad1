"""`neox-jax train`: one command line reproduces a run (config file(s) + overrides)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT-NeoX model (sharded, one jitted step)",
        description="Train from a neox-jax run YAML (sections model, mesh, data, optimizer, train; see "
                    "configs/train/tinyshakespeare.yaml) or from GPT-NeoX's own YAML file(s) (e.g. "
                    "configs/pythia/1-4B.yml; several files are merged in order, as GPT-NeoX does). The run "
                    "directory receives the resolved config.yaml, metrics.jsonl, TensorBoard events and "
                    "training checkpoints under checkpoints/STEP (section `checkpoint`: when); a run "
                    "directory with checkpoints is resumed from the newest complete one.")
    p.add_argument("config", nargs="+", help="run YAML, or GPT-NeoX YAML file(s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key, e.g. --set optimizer.lr=3e-4 --set model.remat=full (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: runs/<config file name>)")
    p.add_argument("--init-from", metavar="CKPT", help="start from a neox-jax checkpoint's parameters "
                                                       "(same architecture) instead of random init")
    p.add_argument("--start-step", type=int, metavar="N",
                   help="begin at step N: its data position and learning rate, fresh optimizer moments "
                        "(e.g. with --init-from a converted Pythia checkpoint of step N)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--resume", dest="resume", action="store_const", const="require", default="auto",
                   help="continue from the run directory's newest complete checkpoint (the default when "
                        "it has one; with --resume, its absence is an error)")
    r.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="refuse to continue a run directory that has checkpoints")
    p.add_argument("--resume-fallback", action="store_true",
                   help="if the newest checkpoint cannot be restored, resume from the previous one")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that has a run: the old one is moved aside and "
                        "deleted once the new run has a complete checkpoint; an error before then puts it "
                        "back")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g = p.add_argument_group("several processes", "one process per host or GPU (docs/scaling.md); without "
                             "these, SLURM's srun and the NEOX_JAX_* variables of launch/*.sh are detected")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (all processes give the same)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's rank in [0, N)")
    p.set_defaults(run=_run_train)
    p.ignored_with("--resume-fallback", "--no-resume")
    p.ignored_with("--resume-fallback", "--overwrite")  # an --overwrite run starts over: nothing to fall back on
    for option in ("--run-dir", "--overwrite", "--resume", "--no-resume", "--resume-fallback", "--coordinator",
                   "--num-processes", "--process-id"):  # --print-config prints and exits
        p.ignored_with(option, "--print-config")


def _distributed_plan(args, overrides):
    """Multi-process settings from the command line, else the run config's mesh section, else the
    environment (read before JAX starts: jax.distributed must initialise before any backend)."""
    from .. import distributed
    from .config import apply_overrides, is_neox_yaml, read_yaml

    mesh = {}
    if len(args.config) == 1:
        raw = read_yaml(args.config[0])
        if not is_neox_yaml(raw):
            mesh = apply_overrides(raw, overrides).get("mesh") or {}
    pick = lambda flag, key, unset: flag if flag is not None else (  # noqa: E731
        None if mesh.get(key, unset) == unset else mesh[key])
    return distributed.resolve(pick(args.coordinator, "coordinator", ""),
                               pick(args.num_processes, "num_processes", 0),
                               pick(args.process_id, "process_id", -1))


def _run_train(args) -> int:
    from .config import load_run_config

    overrides = list(args.set)
    if args.init_from:
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")
    if args.start_step is not None:
        overrides.append(f"train.start_step={args.start_step}")
    plan = None if args.print_config else _distributed_plan(args, overrides)
    from .. import distributed

    distributed.initialize(plan)
    import jax

    # a GPT-NeoX config without train_batch_size needs the device count for its global batch
    run = load_run_config(args.config, overrides, num_devices=jax.device_count())
    if args.print_config:
        import yaml

        print(yaml.safe_dump(run.to_dict(), sort_keys=False), end="")
        return 0
    from .loop import train

    run_dir = Path(args.run_dir or Path("runs") / Path(args.config[0]).stem)
    summary = train(run, run_dir, overwrite=args.overwrite, progress=sys.stderr.isatty(), resume=args.resume,
                    resume_fallback=args.resume_fallback)
    if jax.process_index() == 0:
        print(json.dumps(summary))
    # stopped by a signal (its checkpoint committed): not finished, so not 0, as a scheduler and `&&` expect
    return 128 + signal.Signals[summary["stopped_by"]].value if summary["stopped_by"] else 0
