"""`neox-jax convert`: one reader, one writer, one tensor at a time, then (optionally) --verify.

    reader = open_reader(SRC)          # validates every name and shape against the config first
    tmp    = prepare_destination(DST)  # refuses a non-empty DST unless --overwrite
    for entry in reader.entries():     # source order (layer-major for HF and NeoX)
        writer.write(entry, cast(reader.read(entry), --dtype))
    writer.finish(); verify(tmp); commit_destination(tmp, DST)

Any error (or a failed --verify) removes the temporary directory, so DST is either the complete
new checkpoint or untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ..checkpoint import CheckpointError, commit_destination, prepare_destination
from ..errors import UserError
from .formats import FORMATS, Entry, Reader, cast, dtype_name, human_bytes, np_dtype, open_reader, parse_size

log = logging.getLogger("neox_jax")


@dataclasses.dataclass
class ConvertResult:
    dst: Path
    src_format: str
    dst_format: str
    rows: list[dict]  # per (source dtype, written dtype): tensors, bytes
    seconds: float
    verify: dict | None = None


def make_writer(fmt: str, tmp: Path, reader: Reader, entries: list[Entry], *, dst: Path, tp: int,
                max_shard_size: int, step: int | None):
    cfg = reader.config
    if fmt == "orbax":
        from .orbax_io import OrbaxWriter

        return OrbaxWriter(tmp, cfg, entries, extras=reader.extras,
                           source={"format": reader.fmt, "path": str(Path(reader.path).resolve())})
    if fmt == "hf":
        from .hf import HFWriter

        return HFWriter(tmp, cfg, entries, max_shard_size=max_shard_size, extras=reader.extras)
    if fmt == "neox":
        from .neox import NeoxWriter

        st = step if step is not None else int(reader.extras.get("step", 0))
        return NeoxWriter(tmp, cfg, entries, tp=tp, step=st, final_dst=dst, extras=reader.extras)
    raise UserError(f"--to {fmt!r}: expected one of {FORMATS}")


def _progress(entries, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return entries
    return tqdm(entries, desc=desc, unit="tensor", disable=None if sys.stderr.isatty() else True,
                dynamic_ncols=True, leave=False)


def convert(src: str, dst: str, *, to: str = "orbax", dtype: str | None = None, tp: int = 1,
            verify: bool = False, overwrite: bool = False, max_shard_size: str | int = "5GB",
            neox_config: list[str] | None = None, step: int | None = None) -> ConvertResult:
    if to not in FORMATS:
        raise UserError(f"--to {to!r}: expected one of {FORMATS}")
    if tp < 1:
        raise UserError(f"--tp {tp}: must be >= 1")
    if tp != 1 and to != "neox":
        raise UserError("--tp applies to --to neox only (HF and Orbax checkpoints are not tensor-parallel shards)")
    src_p, dst_p = Path(src).resolve(), Path(dst).resolve()
    if src_p == dst_p or src_p in dst_p.parents or dst_p in src_p.parents:
        raise UserError(f"{dst}: DST must not be SRC or contain it (or be inside it)")
    shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if shard < 1:
        raise UserError(f"--max-shard-size {max_shard_size}: must be positive")
    if step is not None and step < 0:
        raise UserError(f"--step {step}: must be >= 0")
    if Path(dst).is_symlink():
        raise UserError(f"{dst}: is a symbolic link (to {os.readlink(dst)}); give the real directory")
    out_dt = np_dtype(dtype) if dtype else None

    t0 = time.perf_counter()
    reader = open_reader(src, neox_config=neox_config)
    tmp = None
    writer = None
    try:
        entries = reader.entries()
        out_entries = [e.with_dtype(out_dt) if out_dt is not None else e for e in entries]
        tmp = prepare_destination(dst, overwrite)
        writer = make_writer(to, tmp, reader, out_entries, dst=dst_p, tp=tp, max_shard_size=shard, step=step)
        log.info("converting %s -> %s (%s, %d tensors)", reader.describe(), dst, to, len(entries))
        rows: dict[tuple[str, str], dict] = {}
        for e, oe in zip(_progress(entries, f"{reader.fmt}->{to}"), out_entries):
            a = cast(reader.read_torch(e) if writer.layout == "torch" else reader.read(e), out_dt)
            writer.write(oe, a)
            r = rows.setdefault((dtype_name(e.dtype), dtype_name(a.dtype)), {"tensors": 0, "bytes": 0})
            r["tensors"] += 1
            r["bytes"] += a.nbytes
            del a
        writer.finish()
        sync_tree(tmp)
        seconds = time.perf_counter() - t0
        result = ConvertResult(dst_p, reader.fmt, to, [
            {"source_dtype": k[0], "dtype": k[1], **v} for k, v in sorted(rows.items())], seconds)
        if verify:
            from .verify import verify_conversion

            narrowed = any(np_dtype(oe.dtype).itemsize < np_dtype(e.dtype).itemsize or
                           (oe.dtype != e.dtype and np_dtype(oe.dtype).itemsize == np_dtype(e.dtype).itemsize)
                           for e, oe in zip(entries, out_entries))
            reader.close()
            result.verify = verify_conversion(src, reader.fmt, tmp, to, neox_config=neox_config,
                                              narrowed_to=dtype if narrowed else None, dst_label=str(dst))
            if not result.verify["ok"]:
                v = result.verify
                raise VerifyError(
                    f"verify failed: max |dlogit| {v['max_abs_diff']:.3g} > tolerance {v['tolerance']:.3g} "
                    f"(mean KL {v['mean_kl']:.3g}); {dst} was not written")
        commit_destination(tmp, dst)
        tmp = None
        return result
    finally:
        reader.close()
        if writer is not None and tmp is not None:
            writer.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under root once, before the rename that publishes it
    (the writers themselves write without per-write syncs)."""
    import os

    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class VerifyError(CheckpointError):
    """--verify found logits outside the tolerance."""


def summary_table(result: ConvertResult) -> str:
    lines = [f"converted {result.src_format} -> {result.dst_format}: {result.dst}",
             f"  {'source dtype':<14}{'written dtype':<15}{'tensors':>9}{'bytes':>14}"]
    nt = nb = 0
    for r in result.rows:
        lines.append(f"  {r['source_dtype']:<14}{r['dtype']:<15}{r['tensors']:>9}{human_bytes(r['bytes']):>14}")
        nt += r["tensors"]
        nb += r["bytes"]
    rate = nb / max(result.seconds, 1e-9)
    lines.append(f"  {'total':<29}{nt:>9}{human_bytes(nb):>14}   {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    if result.verify:
        v = result.verify
        lines.append(f"  verify: {v['reference']} vs {v['candidate']}, batch {v['batch']}:\n    max |dlogit| "
                     f"{v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g} = {v['tolerance_factor']:g} x max "
                     f"|logit| {v['max_abs_logit']:.3g}), mean KL {v['mean_kl']:.3g}: {'OK' if v['ok'] else 'FAILED'}")
    return "\n".join(lines)
