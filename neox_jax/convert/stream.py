"""`neox-jax convert`: one reader, one writer, one tensor at a time, then (optionally) --verify.

    reader = open_reader(SRC)          # validates every name and shape against the config first
    out    = open_destination(DST)     # refuses a non-empty DST unless --overwrite
    for entry in reader.entries():     # source order (layer-major for HF and NeoX)
        writer.write(entry, cast(reader.read(entry), --dtype))
    writer.finish(); verify(out.path); out.commit()

Any error, SIGINT, SIGTERM (or a failed --verify) removes the temporary directory, so DST is either
the complete new checkpoint or untouched (neox_jax/atomic.py).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

from ..atomic import check_not_input, test_pause
from ..checkpoint import check_destination, open_destination
from ..errors import UserError, VerifyError
from .dispatch import FORMATS, make_writer, open_reader
from .formats import cast, dtype_name, human_bytes, np_dtype, parse_size

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ConvertResult:
    dst: Path
    src_format: str
    dst_format: str
    rows: list[dict]  # per (source dtype, written dtype): tensors, bytes
    seconds: float
    verify: dict | None = None


def _progress(entries, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return entries
    return tqdm(entries, desc=desc, unit="tensor", disable=None if sys.stderr.isatty() else True,
                dynamic_ncols=True, leave=False)


def convert(src: str, dst: str, *, to: str = "orbax", dtype: str | None = None, tp: int = 1,
            verify: bool = False, overwrite: bool = False, max_shard_size: str | int = "5GB",
            neox_config: list[str] | None = None, step: int | None = None,
            neox_names: str = "current") -> ConvertResult:
    if to not in FORMATS:
        raise UserError(f"--to {to!r}: expected one of {FORMATS}")
    if tp < 1:
        raise UserError(f"--tp {tp}: must be >= 1")
    if step is not None and to != "neox":
        raise UserError(f"--step applies to --to neox only (not --to {to})")
    if tp != 1 and to != "neox":
        raise UserError("--tp applies to --to neox only (HF and Orbax checkpoints are not tensor-parallel shards)")
    check_not_input(dst, [("SRC", src), *(("--neox-config", c) for c in neox_config or ())])
    dst_p = Path(dst).resolve()
    try:
        shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    except UserError as e:
        raise UserError(f"--max-shard-size: {e}") from None
    if shard < 1:
        raise UserError(f"--max-shard-size {max_shard_size}: must be positive")
    if step is not None and step < 0:
        raise UserError(f"--step {step}: must be >= 0")
    out_dt = np_dtype(dtype) if dtype else None

    check_destination(dst, overwrite)  # before any reading

    t0 = time.perf_counter()
    reader = open_reader(src, neox_config=neox_config)
    writer = None
    try:
        entries = reader.entries()
        out_entries = [e.with_dtype(out_dt) if out_dt is not None else e for e in entries]
        with open_destination(dst, overwrite) as out:
            try:
                tmp = out.path
                writer = make_writer(to, tmp, reader, out_entries, dst=dst_p, tp=tp, max_shard_size=shard,
                                     step=step, neox_names=neox_names)
                log.info("converting %s -> %s (%s, %d tensors)", reader.describe(), dst, to, len(entries))
                rows: dict[tuple[str, str], dict] = {}
                for e, oe in zip(_progress(entries, f"{reader.fmt}->{to}"), out_entries):
                    a = cast(reader.read_torch(e) if writer.layout == "torch" else reader.read(e), out_dt)
                    writer.write(oe, a)
                    r = rows.setdefault((dtype_name(e.dtype), dtype_name(a.dtype)), {"tensors": 0, "bytes": 0})
                    r["tensors"] += 1
                    r["bytes"] += a.nbytes
                    del a
                    test_pause("convert-tensor")
                writer.finish()
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
                out.commit()
            finally:
                if writer is not None and out.state != "done":
                    writer.abort()  # end in-flight writes before the temporary directory is deleted
        return result
    finally:
        reader.close()


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
