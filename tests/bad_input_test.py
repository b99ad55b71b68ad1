"""Bad input to every command, table-driven (issue 8): each case builds its input in its own directory,
runs the command in-process through `neox_jax.cli.main` and asserts the CLI contract:

* exit status 2;
* exactly one stderr line starting `neox-jax: error:`, containing what the case names (file, key,
  tensor or option), short (no tensorstore spec or pickle dump), and no traceback;
* the case directory byte-identical afterwards: pre-existing outputs untouched, no temporaries or
  partial outputs left (`snapshot` walks every file, symlink and directory);
* the shared fixtures untouched (checked once at the end).

Fixtures are tiny and built once: a neox-jax checkpoint (`init configs/tiny.yaml`, 512-row
vocabulary), a random HF GPT-NeoX (`save_pretrained` layout, written by the fixtures in
convert_fixtures.py) and its native GPT-NeoX twin, an indexed dataset written by hand to the published
.bin/.idx layout, and the shared 20B tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from convert_fixtures import save_hf, tiny_hf, write_neox
from neox_jax.cli import main

REPO = Path(__file__).resolve().parent.parent
MAX_LINE = 600  # an error line longer than this is dumping something (a TensorStore spec, a pickle)


# ----------------------------------------------------------------------------- fixtures


def write_indexed(prefix: Path, docs: list[list[int]], dtype=np.uint16, *, sizes=None, pointers=None,
                  doc_idx=None, extra_bin: bytes = b"") -> None:
    """PREFIX.bin/.idx written from the published MMIDIDX layout (independent of neox_jax.data)."""
    dt = np.dtype(dtype)
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[dt]
    sizes = np.array([len(d) for d in docs], np.int32) if sizes is None else np.asarray(sizes, np.int32)
    if pointers is None:
        pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * dt.itemsize
    doc_idx = np.arange(len(docs) + 1) if doc_idx is None else doc_idx
    data = b"".join(np.asarray(d, dt).tobytes() for d in docs) + extra_bin
    Path(f"{prefix}.bin").write_bytes(data)
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx))
    Path(f"{prefix}.idx").write_bytes(head + sizes.astype("<i4").tobytes()
                                      + np.asarray(pointers, "<i8").tobytes() + np.asarray(doc_idx, "<i8").tobytes())


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture(scope="module")
def fx(tmp_path_factory, neox_tokenizer_path):
    d = tmp_path_factory.mktemp("fixtures")
    assert main(["-q", "init", str(REPO / "configs" / "tiny.yaml"), str(d / "ck"),
                 "--set", "model.vocab_size=512", "--set", "model.tokenizer_vocab_size=0"]) == 0
    model = tiny_hf(3)
    save_hf(model, d / "hf", dtype=torch.float32)
    write_neox(tiny_hf(3), d / "neox", tp=1)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(rng.integers(5, 40))).tolist() for _ in range(40)]
    write_indexed(d / "ds", docs)
    (d / "docs.jsonl").write_text("".join(json.dumps({"tokens": t[:20]}) + "\n" for t in docs[:3]))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(5)))
    (d / "run.yaml").write_text(yaml.safe_dump(run_config(str(d / "ds"))))
    return {"dir": d, "ck": d / "ck", "hf": d / "hf", "neox": d / "neox", "ds": d / "ds", "docs": d / "docs.jsonl",
            "text": d / "text.jsonl", "tok": Path(neox_tokenizer_path), "run": d / "run.yaml",
            "before": snapshot(d)}


def run_config(prefix: str, **train) -> dict:
    return {
        "model": {"preset": "tiny", "vocab_size": 512, "tokenizer_vocab_size": 0, "hidden_size": 32, "num_heads": 2,
                  "intermediate_size": 64, "max_position_embeddings": 32},
        "data": {"path": prefix, "split": "949,50,1", "seq_length": 16},
        "optimizer": {"lr": 1e-3},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "eval_every": 0, "eval_steps": 0, **train},
    }


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- helpers for the cases


def copy(fx, name: str, d: Path) -> Path:
    return Path(shutil.copytree(fx[name], d / name))


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DROP:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


DROP = object()


def hf_with(fx, d, **changes) -> Path:
    src = copy(fx, "hf", d)
    edit_json(src / "config.json", **changes)
    return src


def neox_with(fx, d, **changes) -> Path:
    src = copy(fx, "neox", d)
    yml = src / "global_step1000" / "configs" / "model.yml"
    y = yaml.safe_load(yml.read_text())
    y.update({k.replace("_", "-"): v for k, v in changes.items()})
    yml.write_text(yaml.safe_dump(y))
    return src


def neox_dup_key(fx, d) -> Path:
    src = copy(fx, "neox", d)
    yml = src / "global_step1000" / "configs" / "model.yml"
    yml.write_text(yml.read_text() + "hidden-size: 4096\n")
    return src


def ck_with(fx, d, **changes) -> Path:
    ck = copy(fx, "ck", d)
    edit_json(ck / "config.json", **changes)
    return ck


def ck_without(fx, d, rel: str) -> Path:
    """The checkpoint copy with `rel` (a file or directory) removed."""
    ck = copy(fx, "ck", d)
    target = ck / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return ck


def ck_marker(fx, d, **changes) -> Path:
    ck = copy(fx, "ck", d)
    edit_json(ck / "neox_jax.json", **changes)
    return ck


def hf_config_text(fx, d, text: str) -> Path:
    src = copy(fx, "hf", d)
    (src / "config.json").write_text(text)
    return src


def write(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def short_bin(fx, d) -> Path:
    p = ds_with(fx, d)
    Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-6])
    return p


def model_yaml(d: Path, text: str) -> Path:
    (d / "m.yaml").write_text(text)
    return d / "m.yaml"


def non_empty_dir(d: Path, name: str) -> Path:
    (d / name).mkdir()
    existing(d / name, "x")
    return d / name


def biggest_array_file(ck: Path) -> Path:
    files = [p for p in (ck / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def damaged_ck(fx, d, how: str) -> Path:
    ck = copy(fx, "ck", d)
    f = biggest_array_file(ck)
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "zeroed":
        f.write_bytes(bytes(f.stat().st_size))
    elif how == "deleted":
        f.unlink()
    return ck


def st_with(fx, d, edit) -> Path:
    """The HF copy with its model.safetensors header edited by edit(header, data) -> (header, data)."""
    src = copy(fx, "hf", d)
    f = src / "model.safetensors"
    header, data = read_st(f)
    header, data = edit(header, data)
    write_st(f, header, data)
    return src


def keys_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap(header, data):
    a, b = keys_by_offset(header)[:2]
    sa, ea = header[a]["data_offsets"]
    sb, eb = header[b]["data_offsets"]
    if eb - sb == ea - sa:
        header[b]["data_offsets"] = [sa, ea]  # b reads a's bytes
    else:
        header[b]["data_offsets"] = [sb - 4, eb - 4]
    return header, data


def gap(header, data):
    """Every tensor after the first moved 8 bytes on: a hole of 8 unused bytes."""
    for k in keys_by_offset(header)[1:]:
        s, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = [s + 8, e + 8]
    first = keys_by_offset(header)[0]
    end = header[first]["data_offsets"][1]
    return header, data[:end] + bytes(8) + data[end:]


def trailing(header, data):
    return header, data + bytes(16)


def shape_mismatch(header, data):
    k = keys_by_offset(header)[0]
    header[k]["dtype"] = "F16"  # half the bytes the offsets span
    return header, data


def two_shards(fx, d) -> Path:
    """A sharded copy whose final_layer_norm.weight is in both shards (index lists one)."""
    from safetensors.torch import load_file, save_file

    src = copy(fx, "hf", d)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    dup = "gpt_neox.final_layer_norm.weight"
    a = {k: sd[k] for k in keys[:half]}
    b = {k: sd[k] for k in keys[half:]}
    a[dup], b[dup] = sd[dup], sd[dup]
    save_file(a, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b
                                                                if k not in a}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return src


def tied_with_embed_out(fx, d) -> Path:
    src = copy(fx, "hf", d)
    edit_json(src / "config.json", tie_word_embeddings=True)
    return src  # the files still carry embed_out.weight


def bin_as(fx, d, content: bytes) -> Path:
    src = d / "bin"
    src.mkdir()
    shutil.copy(fx["hf"] / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(content)
    return src


def evil_pickle(fx, d) -> Path:
    from safetensors.torch import load_file

    src = bin_as(fx, d, b"")
    sd = load_file(str(fx["hf"] / "model.safetensors"))
    sd["extra"] = os.system
    torch.save(sd, src / "pytorch_model.bin")
    return src


def zst(d: Path, truncate: bool) -> Path:
    import zstandard

    text = "".join(json.dumps({"text": f"line {i} " * 50}) + "\n" for i in range(400)).encode()
    blob = zstandard.ZstdCompressor().compress(text)
    f = d / "in.jsonl.zst"
    f.write_bytes(blob[: len(blob) // 2] if truncate else blob)
    return f


def ds_with(fx, d, **kw) -> Path:
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 500, size=10).tolist() for _ in range(20)]
    write_indexed(d / "ds", docs, **kw)
    return d / "ds"


def bad_doc_idx(fx, d):
    return ds_with(fx, d, doc_idx=np.array([0, 3, 2] + list(range(4, 21))))


def bad_pointers(fx, d):
    p = np.arange(20, dtype=np.int64) * 20
    p[5] += 4  # item 5 starts inside item 5's own bytes + 4: not cumsum(sizes)
    return ds_with(fx, d, pointers=p)


def index_maps_out_of_range(fx, d):
    """Cached NeoX index maps of the right shapes holding an index past the dataset."""
    from neox_jax.data.order import build_index_maps, index_map_paths

    prefix = copy_ds(fx, d)
    from neox_jax.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    docs = np.arange(len(ds), dtype=np.int32)
    maps = build_index_maps(str(prefix), "train_0", docs, ds.sizes, 10, 16, 1234, use_cache=False)
    doc_idx = np.array(maps.doc_idx)
    doc_idx[3] = 10_000  # no such document
    for p, arr in zip(index_map_paths(str(prefix), "train_0", 10, 16, 1234),
                      (doc_idx, maps.sample_idx, maps.shuffle_idx)):
        np.save(p, arr)
    return prefix


def vocab_ds(d) -> Path:
    """A dataset holding token ids 700 and 600, past the fixture model's vocabulary of 512."""
    write_indexed(d / "ds", [[1] * 10 + [700, 600] + [2] * 10 for _ in range(3)])
    return d / "ds"


def copy_ds(fx, d) -> Path:
    for ext in (".bin", ".idx"):
        shutil.copy(f"{fx['ds']}{ext}", d / f"ds{ext}")
    return d / "ds"


def train_cfg(fx, d, section: str, key: str, value) -> Path:
    raw = run_config(str(fx["ds"]))
    raw[section][key] = value
    (d / "run.yaml").write_text(yaml.safe_dump(raw))
    return d / "run.yaml"


def neox_train_cfg(fx, d, **changes) -> Path:
    raw = {"num-layers": 2, "hidden-size": 32, "num-attention-heads": 2, "seq-length": 16,
           "max-position-embeddings": 32, "pos-emb": "rotary", "norm": "layernorm", "rotary-pct": 0.25,
           "no-weight-tying": True, "gpt-j-residual": True, "activation": "gelu", "hidden-dropout": 0,
           "attention-dropout": 0, "train-iters": 2, "train-batch-size": 2, "train-micro-batch-size-per-gpu": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "data-path": str(fx["ds"]),
           "eval-iters": 0, "eval-interval": 1000}
    raw.update({k.replace("_", "-"): v for k, v in changes.items()})
    (d / "neox.yml").write_text(yaml.safe_dump(raw))
    return d / "neox.yml"


def non_utf8(d: Path, name: str, key: str = "text") -> Path:
    f = d / name
    f.write_bytes(json.dumps({key: "ok"}).encode() + b"\n" + b'{"' + key.encode() + b'": "\xff\xfe"}\n')
    return f


def lines(d: Path, name: str, *objs) -> Path:
    f = d / name
    f.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return f


def existing(d: Path, name: str) -> Path:
    f = d / name
    f.write_text("precious\n")
    return f


def symlinked_dst(fx, d) -> Path:
    (d / "real").mkdir()
    (d / "real" / "keep.txt").write_text("keep")
    (d / "link").symlink_to(d / "real")
    return d / "link"


def symlinked_file(d: Path, name: str) -> Path:
    """name -> real.txt: an output that is a symbolic link (never replaced, even with --overwrite)."""
    existing(d, "real.txt")
    (d / name).symlink_to(d / "real.txt")
    return d / name


def symlinked_run_dir(d: Path) -> Path:
    """r -> real, a run directory (config.yaml) reached through a symbolic link."""
    (d / "real").mkdir()
    (d / "real" / "config.yaml").write_text("model: {}\n")
    (d / "r").symlink_to(d / "real")
    return d / "r"


def order(fx, *extra: str, prefixes: int = 1) -> list[str]:
    """`data order` over the fixture dataset (`prefixes` times: a blend), steps 0, without cached maps."""
    return ["data", "order", "--data-prefix", *[str(fx["ds"])] * prefixes, "--seq-length", "16", "--num-samples",
            ",".join(["10"] * prefixes), "--steps", "0", "--batch", "1", "--no-cache", *extra]


def blend_set(fx, weights: str) -> list[str]:
    """--set items turning the fixture run into a blend of the dataset with itself, with these weights."""
    return ["--set", "data.path=''", "--set", f"data.train_paths=[{fx['ds']}, {fx['ds']}]", "--set",
            f"data.train_weights={weights}"]


def file_parent(d: Path, name: str) -> Path:
    (d / "afile").write_text("not a directory")
    return d / "afile" / name


# ----------------------------------------------------------------------------- the table
# (id, builder(fx, d) -> argv, needles the error line must contain)

S = str


CASES = [
    # ---- score: options
    ("score-context-negative", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--context", "-3"],
     ["--context", "-3"]),
    ("score-context-zero", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--context", "0"],
     ["--context", "0"]),
    ("score-context-above-max", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--context", "4096"],
     ["--context", "4096", "max_position_embeddings"]),
    ("score-batch-size-zero", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--batch-size", "0"],
     ["--batch-size"]),
    ("score-input-not-utf8", lambda fx, d: ["score", S(fx["ck"]), "--input", S(non_utf8(d, "in.jsonl")),
                                            "--tokenizer", S(fx["tok"])], ["in.jsonl:2", "UTF-8"]),
    ("score-txt-not-utf8", lambda fx, d: ["score", S(fx["ck"]), "--input",
                                          S(write(d, "in.txt", b"ab\xffcd"))],
     ["in.txt", "UTF-8"]),
    ("score-input-missing", lambda fx, d: ["score", S(fx["ck"]), "--input", S(d / "nope.jsonl")], ["nope.jsonl"]),
    ("score-token-out-of-vocab", lambda fx, d: ["score", S(fx["ck"]), "--input",
                                                S(lines(d, "in.jsonl", {"tokens": [1, 2]}, {"tokens": [3, 9999]}))],
     ["in.jsonl", "9999", "document 1"]),
    ("score-nothing-to-score", lambda fx, d: ["score", S(fx["ck"]), "--input",
                                              S(lines(d, "in.jsonl", {"tokens": [5]})), "--output", S(d / "o.jsonl")],
     ["in.jsonl", "nothing to score"]),
    ("score-output-exists", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--output",
                                           S(existing(d, "o.jsonl"))], ["o.jsonl", "--overwrite"]),
    # ---- score: damaged checkpoints
    ("score-ck-missing-metadata", lambda fx, d: ["score", S(ck_without(fx, d, "params/_METADATA")), "--input", S(fx["docs"])], ["_METADATA"]),
    ("score-ck-missing-marker", lambda fx, d: ["score", S(ck_without(fx, d, "neox_jax.json")), "--input", S(fx["docs"])], ["neox_jax.json"]),
    ("score-ck-missing-params", lambda fx, d: ["score", S(ck_without(fx, d, "params")), "--input", S(fx["docs"])], ["params"]),
    ("score-ck-missing-manifest", lambda fx, d: ["score", S(ck_without(fx, d, "params/manifest.ocdbt")),
                                                 "--input", S(fx["docs"])], ["params"]),
    # the truncated data file and the tensor tensorstore could not read, named (it was a pybind repr)
    ("score-ck-array-truncated", lambda fx, d: ["score", S(damaged_ck(fx, d, "truncated")), "--input",
                                                S(fx["docs"])], ["params/", "/d/", ": tensor ", " unreadable ("]),
    ("generate-ck-array-truncated", lambda fx, d: ["generate", S(damaged_ck(fx, d, "truncated")), "--prompt", "hi"],
     ["params/", "/d/", ": tensor ", " unreadable ("]),
    ("score-ck-array-zeroed", lambda fx, d: ["score", S(damaged_ck(fx, d, "zeroed")), "--input", S(fx["docs"])],
     ["params"]),
    ("score-ck-array-deleted", lambda fx, d: ["score", S(damaged_ck(fx, d, "deleted")), "--input", S(fx["docs"])],
     ["params"]),
    ("score-ck-foreign-format", lambda fx, d: ["score", S(ck_marker(fx, d, format="other")),
                                               "--input", S(fx["docs"])], ["neox_jax.json", "other"]),
    ("score-ck-version-99", lambda fx, d: ["score", S(ck_marker(fx, d, version=99)), "--input", S(fx["docs"])], ["neox_jax.json", "99"]),
    ("score-ck-bool-as-string", lambda fx, d: ["score", S(ck_with(fx, d, tie_word_embeddings="no")),
                                               "--input", S(fx["docs"])], ["config.json", "tie_word_embeddings"]),
    ("score-ck-eps-null", lambda fx, d: ["score", S(ck_with(fx, d, layer_norm_eps=None)), "--input", S(fx["docs"])],
     ["config.json", "layer_norm_eps"]),
    ("score-ck-cudnn-on-cpu", lambda fx, d: ["score", S(ck_with(fx, d, attention="cudnn")), "--input",
                                             S(fx["docs"])], ["cudnn"]),
    # ---- convert: HF config values
    ("convert-hf-tied-no", lambda fx, d: ["convert", S(hf_with(fx, d, tie_word_embeddings="no")), S(d / "dst")],
     ["config.json", "tie_word_embeddings", "'no'"]),
    ("convert-hf-parallel-1", lambda fx, d: ["convert", S(hf_with(fx, d, use_parallel_residual=1)), S(d / "dst")],
     ["config.json", "use_parallel_residual"]),
    ("convert-hf-eps-null", lambda fx, d: ["convert", S(hf_with(fx, d, layer_norm_eps=None)), S(d / "dst")],
     ["config.json", "layer_norm_eps", "null"]),
    ("convert-hf-eps-abc", lambda fx, d: ["convert", S(hf_with(fx, d, layer_norm_eps="abc")), S(d / "dst")],
     ["config.json", "layer_norm_eps", "'abc'"]),
    ("convert-hf-rope-theta-null", lambda fx, d: ["convert", S(hf_with(fx, d, rope_parameters={
        "rope_type": "default", "rope_theta": None, "partial_rotary_factor": 0.25})), S(d / "dst")],
     ["config.json", "rope_theta"]),
    ("convert-hf-rope-parameters-string", lambda fx, d: ["convert", S(hf_with(fx, d, rope_parameters="x")),
                                                         S(d / "dst")], ["config.json", "rope_parameters"]),
    ("convert-hf-layers-string", lambda fx, d: ["convert", S(hf_with(fx, d, num_hidden_layers="2")), S(d / "dst")],
     ["config.json", "num_hidden_layers"]),
    ("convert-hf-vocab-float", lambda fx, d: ["convert", S(hf_with(fx, d, vocab_size=256.5)), S(d / "dst")],
     ["config.json", "vocab_size"]),
    ("convert-hf-config-not-json", lambda fx, d: ["convert", S(hf_config_text(fx, d, "{oops")), S(d / "dst")],
     ["config.json"]),
    ("convert-hf-tied-with-embed-out", lambda fx, d: ["convert", S(tied_with_embed_out(fx, d)), S(d / "dst")],
     ["embed_out.weight", "unexpected"]),
    # ---- convert: safetensors layouts
    ("convert-st-overlap", lambda fx, d: ["convert", S(st_with(fx, d, overlap)), S(d / "dst")],
     ["model.safetensors", "overlap"]),
    ("convert-st-gap", lambda fx, d: ["convert", S(st_with(fx, d, gap)), S(d / "dst")], ["model.safetensors"]),
    ("convert-st-trailing-bytes", lambda fx, d: ["convert", S(st_with(fx, d, trailing)), S(d / "dst")],
     ["model.safetensors"]),
    ("convert-st-dtype-size-mismatch", lambda fx, d: ["convert", S(st_with(fx, d, shape_mismatch)), S(d / "dst")],
     ["model.safetensors"]),
    ("convert-st-tensor-in-two-shards", lambda fx, d: ["convert", S(two_shards(fx, d)), S(d / "dst")],
     ["gpt_neox.final_layer_norm.weight", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
    ("inspect-st-overlap", lambda fx, d: ["inspect", S(st_with(fx, d, overlap))], ["model.safetensors", "overlap"]),
    # ---- convert: PyTorch files
    ("convert-bin-text", lambda fx, d: ["convert", S(bin_as(fx, d, b"hello, this is text\n" * 20)), S(d / "dst")],
     ["pytorch_model.bin"]),
    ("convert-bin-random", lambda fx, d: ["convert", S(bin_as(fx, d, np.random.default_rng(0).bytes(4096))),
                                          S(d / "dst")], ["pytorch_model.bin"]),
    ("convert-bin-pickle-global", lambda fx, d: ["convert", S(evil_pickle(fx, d)), S(d / "dst")],
     ["pytorch_model.bin", "system"]),
    # ---- convert: options
    ("convert-step-negative", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--to", "neox", "--step", "-1"],
     ["--step", "-1"]),
    ("convert-neox-config-missing", lambda fx, d: ["convert", S(fx["neox"]), S(d / "dst"), "--neox-config",
                                                   S(d / "nope.yml")], ["nope.yml"]),
    ("convert-neox-config-missing-hf", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--neox-config",
                                                      S(d / "nope.yml")], ["nope.yml"]),
    ("convert-max-shard-size-zero", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--to", "hf",
                                                   "--max-shard-size", "0"], ["--max-shard-size"]),
    ("convert-tp-zero", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--to", "neox", "--tp", "0"],
     ["--tp"]),
    ("convert-symlinked-dst", lambda fx, d: ["convert", S(fx["hf"]), S(symlinked_dst(fx, d)), "--overwrite"],
     ["link", "symbolic link"]),
    ("convert-dst-exists", lambda fx, d: ["convert", S(fx["hf"]), S(non_empty_dir(d, "dst"))], ["dst", "--overwrite"]),
    ("convert-src-missing", lambda fx, d: ["convert", S(d / "nope"), S(d / "dst")], ["nope"]),
    # ---- convert: GPT-NeoX YAML values
    ("convert-neox-hidden-abc", lambda fx, d: ["convert", S(neox_with(fx, d, hidden_size="abc")), S(d / "dst")],
     ["model.yml", "hidden_size"]),
    ("convert-neox-gptj-no", lambda fx, d: ["convert", S(neox_with(fx, d, gpt_j_residual="no")), S(d / "dst")],
     ["model.yml", "gpt_j_residual"]),
    ("convert-neox-eps-null", lambda fx, d: ["convert", S(neox_with(fx, d, layernorm_epsilon=None)), S(d / "dst")],
     ["model.yml", "layernorm_epsilon"]),
    ("convert-neox-attention-config-string", lambda fx, d: ["convert", S(neox_with(fx, d, attention_config="x")),
                                                            S(d / "dst")], ["model.yml", "attention_config"]),
    # ---- convert / inspect / diff: damaged neox-jax checkpoints
    ("convert-ck-array-truncated", lambda fx, d: ["convert", S(damaged_ck(fx, d, "truncated")), S(d / "dst"),
                                                  "--to", "hf"], ["params"]),
    ("convert-ck-array-deleted", lambda fx, d: ["convert", S(damaged_ck(fx, d, "deleted")), S(d / "dst"),
                                                "--to", "hf"], ["params"]),
    ("convert-ck-array-zeroed", lambda fx, d: ["convert", S(damaged_ck(fx, d, "zeroed")), S(d / "dst"), "--to", "hf"],
     ["params"]),
    ("convert-ck-missing-metadata", lambda fx, d: ["convert", S(ck_without(fx, d, "params/_METADATA")),
                                                   S(d / "dst"), "--to", "hf"], ["_METADATA"]),
    ("convert-ck-foreign-marker", lambda fx, d: ["convert", S(ck_marker(fx, d, format="other")), S(d / "dst"), "--to", "hf"], ["neox_jax.json", "other"]),
    ("inspect-ck-missing-params", lambda fx, d: ["inspect", S(ck_without(fx, d, "params"))], ["params"]),
    ("inspect-ck-array-deleted", lambda fx, d: ["inspect", S(damaged_ck(fx, d, "deleted"))], ["params"]),
    ("inspect-ck-array-truncated", lambda fx, d: ["inspect", S(damaged_ck(fx, d, "truncated"))], ["params"]),
    ("inspect-ck-missing-manifest", lambda fx, d: ["inspect", S(ck_without(fx, d, "params/manifest.ocdbt"))], ["params"]),
    ("diff-ck-array-zeroed", lambda fx, d: ["diff", S(damaged_ck(fx, d, "zeroed")), S(fx["ck"])], ["params"]),
    ("diff-ck-missing-metadata", lambda fx, d: ["diff", S(fx["ck"]), S(ck_without(fx, d, "params/_METADATA"))], ["_METADATA"]),
    ("diff-rtol-negative", lambda fx, d: ["diff", S(fx["hf"]), S(fx["hf"]), "--rtol", "-1"], ["--rtol", "-1"]),
    ("diff-rtol-nan", lambda fx, d: ["diff", S(fx["hf"]), S(fx["hf"]), "--rtol", "nan"], ["--rtol", "nan"]),
    # ---- data preprocess
    ("score-zst-truncated", lambda fx, d: ["score", S(fx["ck"]), "--input", S(zst(d, True))],
     ["in.jsonl.zst", "truncated zstd"]),
    ("generate-zst-truncated", lambda fx, d: ["generate", S(fx["ck"]), "--input", S(zst(d, True))],
     ["in.jsonl.zst", "truncated zstd"]),
    ("eval-zst-truncated", lambda fx, d: ["eval", S(fx["ck"]), "--lambada", S(zst(d, True)), "--output",
                                          S(d / "r.json")], ["in.jsonl.zst", "truncated zstd"]),
    ("preprocess-zst-truncated", lambda fx, d: ["data", "preprocess", S(zst(d, True)), "--output-prefix",
                                                S(d / "out"), "--tokenizer", S(fx["tok"])], ["in.jsonl.zst", "offset"]),
    ("preprocess-every-line-bad", lambda fx, d: ["data", "preprocess", S(lines(d, "in.jsonl", {"x": 1}, {"y": 2})),
                                                 "--output-prefix", S(d / "out"), "--tokenizer", S(fx["tok"])],
     ["in.jsonl", "no document"]),
    ("preprocess-input-missing", lambda fx, d: ["data", "preprocess", S(d / "nope.jsonl"), "--output-prefix",
                                                S(d / "out"), "--tokenizer", S(fx["tok"])], ["nope.jsonl"]),
    ("preprocess-tokenizer-missing", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                    S(d / "out"), "--tokenizer", S(d / "tok.json")], ["tok.json"]),
    ("preprocess-tokenizer-garbage", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                    S(d / "out"), "--tokenizer", S(write(d, "tok.json", b"{nope"))],
     ["tok.json", "tokenizers JSON"]),
    ("preprocess-sentencepiece-garbage", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                        S(d / "out"), "--tokenizer",
                                                        S(write(d, "tok.model", b"\x00\x01garbage"))],
     ["tok.model", "sentencepiece"]),
    ("preprocess-workers-zero", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix", S(d / "out"),
                                               "--tokenizer", S(fx["tok"]), "--workers", "0"], ["--workers"]),
    ("preprocess-output-exists", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                S(existing(d, "out_text_document.bin").parent / "out"),
                                                "--tokenizer", S(fx["tok"])],
     ["out_text_document.bin", "--overwrite"]),
    # ---- data order
    ("order-num-samples-huge", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                              "--num-samples", "1000000000000", "--steps", "0", "--batch", "1",
                                              "--no-cache"], ["--num-samples", "1000000000000"]),
    ("order-num-samples-negative", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length",
                                                  "16", "--num-samples", "-5", "--steps", "0", "--batch", "1"],
     ["--num-samples", "-5"]),
    ("order-train-iters-negative", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length",
                                                  "16", "--train-iters", "-1", "--steps", "0", "--batch", "1"],
     ["--train-iters", "-1"]),
    ("order-idx-doc-idx-inconsistent", lambda fx, d: ["data", "order", "--data-prefix", S(bad_doc_idx(fx, d)),
                                                      "--seq-length", "8", "--num-samples", "4", "--steps", "0",
                                                      "--batch", "1", "--no-cache"], ["ds.idx", "doc_idx"]),
    ("order-idx-pointers-inconsistent", lambda fx, d: ["data", "order", "--data-prefix", S(bad_pointers(fx, d)),
                                                       "--seq-length", "8", "--num-samples", "4", "--steps", "0",
                                                       "--batch", "1", "--no-cache"], ["ds.idx", "pointer"]),
    ("order-bin-longer-than-index", lambda fx, d: ["data", "order", "--data-prefix",
                                                   S(ds_with(fx, d, extra_bin=bytes(6))), "--seq-length", "8",
                                                   "--num-samples", "4", "--steps", "0", "--batch", "1", "--no-cache"],
     ["ds.bin"]),
    ("order-bin-shorter-than-index", lambda fx, d: ["data", "order", "--data-prefix",
                                                    S(short_bin(fx, d)),
                                                    "--seq-length", "8", "--num-samples", "4", "--steps", "0",
                                                    "--batch", "1", "--no-cache"], ["ds.bin"]),
    ("order-index-map-out-of-range", lambda fx, d: ["data", "order", "--data-prefix",
                                                    S(index_maps_out_of_range(fx, d)), "--seq-length", "16",
                                                    "--num-samples", "10", "--steps", "0", "--batch", "1"],
     ["doc_idx.npy"]),
    ("order-steps-backwards", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                             "--num-samples", "10", "--steps", "5:2", "--batch", "1", "--no-cache"],
     ["--steps"]),
    ("order-prefix-missing", lambda fx, d: ["data", "order", "--data-prefix", S(d / "nope"), "--seq-length", "16",
                                            "--num-samples", "10", "--steps", "0", "--batch", "1"], ["nope.idx"]),
    ("order-weights-mismatch", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                              "--num-samples", "10", "--steps", "0", "--batch", "1", "--weights", "1",
                                              "2", "--no-cache"], ["weights"]),
    # ---- data train-tokenizer
    ("tokenizer-min-frequency-negative", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                        S(d / "t.json"), "--vocab-size", "300", "--min-frequency",
                                                        "-3"], ["--min-frequency", "-3"]),
    ("tokenizer-vocab-size-huge", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                 S(d / "t.json"), "--vocab-size", "1000000000"],
     ["--vocab-size", "1000000000"]),
    ("tokenizer-output-unwritable", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                   S(file_parent(d, "t.json")), "--vocab-size", "300"], ["afile"]),
    ("tokenizer-sp-output-unwritable", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                      S(file_parent(d, "t.model")), "--vocab-size", "300"], ["afile"]),
    ("preprocess-output-prefix-empty", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix", "",
                                                      "--tokenizer", S(fx["tok"])], ["--output-prefix ''", "file name"]),
    ("preprocess-output-prefix-a-directory", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                            f"{d}/", "--tokenizer", S(fx["tok"])],
     ["--output-prefix", "file name"]),
    ("tokenizer-input-not-utf8", lambda fx, d: ["data", "train-tokenizer", S(write(d, "in.txt", b"a\xffb")),
                                                "--output", S(d / "t.json"), "--vocab-size", "300"], ["in.txt"]),
    ("tokenizer-sp-input-not-utf8", lambda fx, d: ["data", "train-tokenizer", S(write(d, "in.txt", b"a\xffb")),
                                                   "--output", S(d / "t.model"), "--vocab-size", "300"], ["in.txt"]),
    ("tokenizer-sp-vocab-size-huge", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                    S(d / "t.model"), "--vocab-size", "1000000000"],
     ["--vocab-size", "1000000000"]),
    # ---- train
    ("train-bool-as-string", lambda fx, d: ["train", S(train_cfg(fx, d, "model", "tie_word_embeddings", "no")),
                                            "--run-dir", S(d / "r")], ["run.yaml", "tie_word_embeddings"]),
    ("train-steps-string", lambda fx, d: ["train", S(train_cfg(fx, d, "train", "steps", "abc")), "--run-dir",
                                          S(d / "r")], ["run.yaml", "train.steps"]),
    ("train-lr-null", lambda fx, d: ["train", S(train_cfg(fx, d, "optimizer", "lr", None)), "--run-dir", S(d / "r")],
     ["run.yaml", "optimizer.lr"]),
    ("train-data-missing", lambda fx, d: ["train", S(train_cfg(fx, d, "data", "path", S(d / "nodata"))), "--run-dir",
                                          S(d / "r")], ["nodata"]),
    ("train-init-from-missing", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--init-from",
                                               S(d / "nockpt")], ["nockpt"]),
    ("train-overwrite-symlinked-run-dir", lambda fx, d: ["train", S(fx["run"]), "--set", "train.batch_size=8",
                                                        "--run-dir", S(symlinked_run_dir(d)), "--overwrite"],
     ["r", "symbolic link"]),
    ("train-overwrite-not-a-run-dir", lambda fx, d: ["train", S(fx["run"]), "--set", "train.batch_size=8",
                                                     "--run-dir", S(non_empty_dir(d, "r")), "--overwrite"],
     ["r", "not a neox-jax run directory"]),
    # without --overwrite: no hint to pass it (which would not delete a directory without config.yaml)
    ("train-not-a-run-dir", lambda fx, d: ["train", S(fx["run"]), "--set", "train.batch_size=8",
                                           "--run-dir", S(non_empty_dir(d, "r"))],
     ["r", "not a neox-jax run directory", "--overwrite would not delete it"]),
    ("train-config-missing", lambda fx, d: ["train", S(d / "none.yaml"), "--run-dir", S(d / "r")], ["none.yaml"]),
    ("train-neox-yaml-bool", lambda fx, d: ["train", S(neox_train_cfg(fx, d, gpt_j_residual="no")), "--run-dir",
                                            S(d / "r")], ["neox.yml", "gpt_j_residual"]),
    ("train-neox-yaml-lr-string", lambda fx, d: ["train", S(neox_train_cfg(
        fx, d, optimizer={"type": "Adam", "params": {"lr": "fast"}})), "--run-dir", S(d / "r")],
     ["neox.yml", "lr"]),
    ("train-neox-yaml-fp16-string", lambda fx, d: ["train", S(neox_train_cfg(fx, d, fp16="x")), "--run-dir",
                                                   S(d / "r")], ["neox.yml", "fp16"]),
    ("train-set-bad-value", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set",
                                           "train.batch_size=many"], ["train.batch_size"]),
    ("train-neox-yaml-betas-string", lambda fx, d: ["train", S(neox_train_cfg(
        fx, d, optimizer={"type": "Adam", "params": {"lr": 1e-3, "betas": "0.9,0.95"}})), "--run-dir", S(d / "r")],
     ["neox.yml", "betas"]),
    # ---- generate
    ("generate-max-new-tokens-zero", lambda fx, d: ["generate", S(fx["ck"]), "--prompt", "hi", "--max-new-tokens",
                                                    "0", "--tokenizer", S(fx["tok"])], ["--max-new-tokens"]),
    ("generate-batch-size-zero", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--batch-size",
                                                "0"], ["--batch-size"]),
    ("generate-top-p-above-one", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--top-p", "2",
                                                "--temperature", "1"], ["--top-p"]),
    ("generate-temperature-negative", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                     S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})),
                                                     "--temperature", "-1"], ["--temperature"]),
    ("generate-ckpt-missing", lambda fx, d: ["generate", S(d / "nockpt"), "--input",
                                             S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]}))], ["nockpt"]),
    ("generate-input-not-utf8", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                               S(non_utf8(d, "p.jsonl", "prompt")), "--tokenizer", S(fx["tok"])],
     ["p.jsonl:2", "UTF-8"]),
    ("generate-token-out-of-vocab", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                   S(lines(d, "p.jsonl", {"prompt_tokens": [1, 99999]}))],
     ["p.jsonl", "99999"]),
    ("generate-output-exists", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                              S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--output",
                                              S(existing(d, "o.jsonl"))], ["o.jsonl", "--overwrite"]),
    ("generate-tokenizer-garbage", lambda fx, d: ["generate", S(fx["ck"]), "--prompt", "hi", "--tokenizer",
                                                  S(write(d, "tok.json", b"not json"))], ["tok.json"]),
    ("generate-ck-array-deleted", lambda fx, d: ["generate", S(damaged_ck(fx, d, "deleted")), "--input",
                                                 S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]}))], ["params"]),
    ("generate-output-symlink", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                               S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--max-new-tokens",
                                               "2", "--output", S(symlinked_file(d, "o.jsonl")), "--overwrite"],
     ["o.jsonl", "symbolic link"]),
    ("generate-output-unwritable", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                  S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})),
                                                  "--max-new-tokens", "2", "--output", S(file_parent(d, "o.jsonl"))],
     ["afile"]),
    # ---- eval
    ("eval-batch-size-zero", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--batch-size", "0",
                                            "--output", S(d / "r.json")], ["--batch-size"]),
    ("eval-perplexity-missing", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(d / "nope.jsonl"),
                                               "--output", S(d / "r.json")], ["nope.jsonl"]),
    ("eval-context-negative", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--context", "-1",
                                             "--output", S(d / "r.json")], ["--context"]),
    ("eval-context-above-max", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--context",
                                              "100000", "--output", S(d / "r.json")], ["--context", "100000"]),
    ("eval-lambada-not-utf8", lambda fx, d: ["eval", S(fx["ck"]), "--lambada", S(non_utf8(d, "l.jsonl")),
                                             "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["l.jsonl:2", "UTF-8"]),
    ("eval-perplexity-token-out-of-vocab", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity",
                                                          S(lines(d, "in.jsonl", {"tokens": [1, 99999]})), "--output",
                                                          S(d / "r.json")], ["in.jsonl", "99999"]),
    ("eval-data-prefix-token-out-of-vocab", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(vocab_ds(d)),
                                                           "--seq-length", "16", "--output", S(d / "r.json")],
     ["ds: token id 700 outside the vocabulary [0, 512)"]),
    ("eval-max-samples-negative", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(fx["ds"]), "--max-samples",
                                                 "-2", "--seq-length", "16", "--output", S(d / "r.json")],
     ["--max-samples"]),
    ("eval-output-exists", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--output",
                                          S(existing(d, "r.json"))], ["r.json", "--overwrite"]),
    ("eval-ck-array-truncated", lambda fx, d: ["eval", S(damaged_ck(fx, d, "truncated")), "--perplexity",
                                               S(fx["docs"]), "--output", S(d / "r.json")],
     ["params/", "/d/", ": tensor ", " unreadable ("]),
    ("eval-output-symlink", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--output",
                                           S(symlinked_file(d, "r.json")), "--overwrite"], ["r.json", "symbolic link"]),
    ("eval-output-unwritable", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--output",
                                              S(file_parent(d, "r.json"))], ["afile"]),
    ("eval-tasks-empty", lambda fx, d: ["eval", S(fx["ck"]), "--tasks", ",,", "--output", S(d / "r.json")],
     ["--tasks ',,'", "no task name"]),
    ("eval-include-path-a-file", lambda fx, d: ["eval", S(fx["ck"]), "--tasks", "t", "--include-path",
                                                S(write(d, "t.yaml", b"task: t\n")), "--output", S(d / "r.json")],
     ["--include-path", "t.yaml", "not a directory"]),
    # ---- a JSON "\\ud800" escape (valid JSON, json.dumps writes one) or argv bytes that are not UTF-8 (Python
    # carries them as lone surrogates): no tokenizer takes the text
    ("score-text-lone-surrogate", lambda fx, d: ["score", S(fx["ck"]), "--input", S(lines(
        d, "in.jsonl", {"text": "ok"}, {"text": "a\ud800b"})), "--tokenizer", S(fx["tok"])],
     ["in.jsonl:2", "'text'", "unpaired surrogate"]),
    ("eval-perplexity-lone-surrogate", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(lines(
        d, "in.jsonl", {"text": "a\udfffb"})), "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["in.jsonl:1", "'text'", "unpaired surrogate"]),
    ("eval-lambada-lone-surrogate", lambda fx, d: ["eval", S(fx["ck"]), "--lambada", S(lines(
        d, "l.jsonl", {"text": "hello a\ud800b world"})), "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["l.jsonl:1", "'text'", "unpaired surrogate"]),
    ("generate-input-lone-surrogate", lambda fx, d: ["generate", S(fx["ck"]), "--input", S(lines(
        d, "p.jsonl", {"prompt_tokens": [1, 2]}, {"prompt": "a\ud800b"})), "--tokenizer", S(fx["tok"]),
        "--output", S(d / "o.jsonl")], ["p.jsonl:2", "'prompt'", "unpaired surrogate"]),
    ("generate-prompt-not-utf8", lambda fx, d: ["generate", S(fx["ck"]), "--prompt",
                                                os.fsdecode(b"ab\xff\xfe"), "--tokenizer", S(fx["tok"])],
     ["--prompt", "not UTF-8", "byte 0xff at offset 2"]),
    # ---- eval --perplexity with no token to score is refused, as score refuses it
    ("eval-perplexity-empty-jsonl", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(write(d, "in.jsonl", b"")),
                                                   "--output", S(d / "r.json")], ["in.jsonl", "nothing to score"]),
    ("eval-perplexity-empty-txt", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(write(d, "in.txt", b"")),
                                                 "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["in.txt", "nothing to score"]),
    ("eval-perplexity-no-tokens", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity",
                                                 S(lines(d, "in.jsonl", {"tokens": []})), "--output", S(d / "r.json")],
     ["in.jsonl", "nothing to score"]),
    ("eval-perplexity-one-token", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(lines(
        d, "in.jsonl", {"tokens": [5]}, {"tokens": []})), "--output", S(existing(d, "r.json")), "--overwrite"],
     ["in.jsonl", "nothing to score"]),
    ("eval-perplexity-blank-text", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(lines(
        d, "in.jsonl", {"text": "   "})), "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["in.jsonl", "nothing to score"]),
    # ---- init
    ("init-bool-as-string", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"), "--set",
                                           "model.scan_layers=maybe"], ["scan_layers"]),
    ("init-eps-string", lambda fx, d: ["init", S(model_yaml(d, "model: {vocab_size: 64, hidden_size: 8, num_layers: 1, num_heads: 2, "
                                                     "layer_norm_eps: tiny}\n")), S(d / "ck")], ["m.yaml", "layer_norm_eps"]),
    ("init-config-missing", lambda fx, d: ["init", S(d / "none.yaml"), S(d / "ck")], ["none.yaml"]),
    ("init-set-unknown-key", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"), "--set",
                                            "model.hidden=3"], ["hidden"]),
    ("init-dst-symlink", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(symlinked_dst(fx, d)),
                                        "--overwrite"], ["link", "symbolic link"]),
    # ---- found by the adversarial audit (issue: CLI audit)
    ("init-set-not-yaml", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"), "--set",
                                         "model.num_layers={"], ["--set", "model.num_layers={", "YAML"]),
    ("generate-top-k-greedy", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                             S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--top-k", "5"],
     ["--top-k 5", "--temperature"]),
    ("generate-top-p-greedy", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                             S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--top-p", "0.9"],
     ["--top-p 0.9", "--temperature"]),
    ("generate-stop-empty", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                           S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--stop", "x", ""],
     ["--stop ''"]),
    ("generate-stop-not-utf8", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                              S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--stop",
                                              os.fsdecode(b"a\xff")], ["--stop", "not UTF-8 (byte 0xff at offset 1)"]),
    ("generate-prompt-too-long", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]},
                                                        {"prompt_tokens": [3] * 300})), "--max-new-tokens", "2"],
     ["p.jsonl", "prompt 1", "300 tokens", "context"]),
    ("eval-limit-without-tasks", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--limit", "3",
                                                "--output", S(d / "r.json")], ["--limit", "--tasks"]),
    ("eval-num-fewshot-without-tasks", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]),
                                                      "--num-fewshot", "2", "--output", S(d / "r.json")],
     ["--num-fewshot", "--tasks"]),
    ("eval-log-samples-without-tasks", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]),
                                                      "--log-samples", "--output", S(d / "r.json")],
     ["--log-samples", "--tasks"]),
    ("eval-seq-length-without-data-prefix", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]),
                                                           "--seq-length", "8", "--output", S(d / "r.json")],
     ["--seq-length", "--data-prefix"]),
    ("eval-max-samples-without-data-prefix", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]),
                                                            "--max-samples", "2", "--output", S(d / "r.json")],
     ["--max-samples", "--data-prefix"]),
    ("eval-split-part-without-split", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(fx["ds"]),
                                                     "--split-part", "test", "--output", S(d / "r.json")],
     ["--split-part", "--split"]),
    ("eval-lambada-is-a-directory", lambda fx, d: ["eval", S(fx["ck"]), "--lambada", S(non_empty_dir(d, "l")),
                                                   "--output", S(d / "r.json")], ["l", "is a directory"]),
    ("score-output-is-a-directory", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--output",
                                                   S(non_empty_dir(d, "out")), "--overwrite"],
     ["out", "is a directory"]),
    ("order-output-is-a-directory", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length",
                                                   "16", "--num-samples", "10", "--steps", "0", "--batch", "1",
                                                   "--no-cache", "--output", S(non_empty_dir(d, "out")),
                                                   "--overwrite"], ["out", "is a directory"]),
    ("init-dst-is-a-file", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(existing(d, "ck")),
                                          "--overwrite"], ["ck", "not a directory"]),
    ("convert-dst-is-a-file", lambda fx, d: ["convert", S(fx["hf"]), S(existing(d, "dst")), "--overwrite"],
     ["dst", "not a directory"]),
    ("export-out-is-ckpt", lambda fx, d: ["export", S(copy(fx, "ck", d)), S(d / "ck"), "--overwrite"],
     ["ck", "CKPT"]),
    ("export-out-inside-ckpt", lambda fx, d: ["export", S(copy(fx, "ck", d)), S(d / "ck" / "sm")], ["sm", "CKPT"]),
    ("convert-dst-inside-src", lambda fx, d: ["convert", S(copy(fx, "ck", d)), S(d / "ck" / "out")], ["out", "SRC"]),
    ("convert-dst-holds-neox-config", lambda fx, d: ["convert", S(fx["neox"]), S(non_empty_dir(d, "out")),
                                                     "--neox-config", S(d / "out" / "x"), "--overwrite"],
     ["out", "--neox-config"]),
    ("order-output-is-idx-of-a-bin-prefix", lambda fx, d: ["data", "order", "--data-prefix", f"{copy_ds(fx, d)}.bin",
                                                           "--seq-length", "16", "--num-samples", "10", "--steps",
                                                           "0", "--batch", "1", "--no-cache", "--output",
                                                           S(d / "ds.idx"), "--overwrite"], ["ds.idx", "input"]),
    ("eval-output-is-idx-of-a-bin-prefix", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", f"{copy_ds(fx, d)}.bin",
                                                          "--output", S(d / "ds.idx"), "--overwrite"],
     ["ds.idx", "input"]),
    ("convert-dst-is-src", lambda fx, d: ["convert", S(copy(fx, "ck", d)), S(d / "ck"), "--overwrite"], ["ck", "SRC"]),
    ("score-output-is-input", lambda fx, d: ["score", S(fx["ck"]), "--input",
                                             S(lines(d, "in.jsonl", {"tokens": [1, 2, 3]})), "--output",
                                             S(d / "in.jsonl"), "--overwrite"], ["in.jsonl", "input"]),
    ("generate-output-is-input", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                                S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--output",
                                                S(d / "p.jsonl"), "--overwrite"], ["p.jsonl", "input"]),
    ("eval-output-is-input", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity",
                                            S(lines(d, "in.jsonl", {"tokens": [1, 2, 3]})), "--output",
                                            S(d / "in.jsonl"), "--overwrite"], ["in.jsonl", "input"]),
    ("order-output-is-data", lambda fx, d: ["data", "order", "--data-prefix", S(copy_ds(fx, d)), "--seq-length",
                                            "16", "--num-samples", "10", "--steps", "0", "--batch", "1", "--no-cache",
                                            "--output", S(d / "ds.bin"), "--overwrite"], ["ds.bin", "input"]),
    ("convert-max-shard-size-garbage", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--to", "hf",
                                                      "--max-shard-size", "abc"], ["--max-shard-size", "abc"]),
    ("order-tokenizer-without-decode", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length",
                                                      "16", "--num-samples", "10", "--steps", "0", "--batch", "1",
                                                      "--no-cache", "--tokenizer", S(fx["tok"])],
     ["--tokenizer", "--decode"]),
    ("order-preshuffled-num-samples", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length",
                                                     "16", "--num-samples", "10", "--steps", "0", "--batch", "1",
                                                     "--preshuffled"], ["--preshuffled", "--num-samples"]),
    ("convert-step-not-neox", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--step", "5"],
     ["--step", "--to neox"]),
    ("convert-max-shard-size-not-hf", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--max-shard-size",
                                                     "1MB"], ["--max-shard-size", "--to hf"]),
    ("convert-neox-config-not-neox", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--neox-config",
                                                    S(fx["neox"] / "global_step1000" / "configs" / "model.yml")],
     ["hf", "--neox-config", "GPT-NeoX"]),
    ("inspect-neox-config-not-neox", lambda fx, d: ["inspect", S(fx["ck"]), "--neox-config",
                                                    S(fx["neox"] / "global_step1000" / "configs" / "model.yml")],
     ["ck", "--neox-config"]),
    ("tokenizer-no-document", lambda fx, d: ["data", "train-tokenizer", S(write(d, "in.jsonl", b"")), "--output",
                                             S(d / "t.json"), "--vocab-size", "300"], ["in.jsonl", "no document"]),
    ("tokenizer-sp-no-document", lambda fx, d: ["data", "train-tokenizer",
                                                S(lines(d, "in.jsonl", {"text": ""}, ["a list"])), "--output",
                                                S(d / "t.model"), "--vocab-size", "300"],
     ["in.jsonl", "no document"]),
    # ---- found by the validation audit: seeds, split and blend weights, non-finite floats, model YAML
    ("order-seed-negative", lambda fx, d: order(fx, "--seed", "-1"), ["--seed", "-1", "2**32 - 1"]),
    ("order-seed-above-2-32", lambda fx, d: order(fx, "--seed", "4294967296"), ["--seed", "4294967296"]),
    ("init-seed-huge", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"), "--seed",
                                      "99999999999999999999999"], ["init", "--seed", "99999999999999999999999"]),
    ("generate-seed-huge", lambda fx, d: ["generate", S(fx["ck"]), "--input",
                                          S(lines(d, "p.jsonl", {"prompt_tokens": [1, 2]})), "--max-new-tokens", "2",
                                          "--temperature", "1", "--seed", "99999999999999999999999"],
     ["generate", "--seed", "99999999999999999999999"]),
    ("train-data-seed-negative", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set",
                                                "data.seed=-1"], ["run.yaml", "data.seed", "-1"]),
    ("train-seed-huge", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set",
                                       "train.seed=99999999999999999999999"], ["run.yaml", "train.seed"]),
    ("order-split-nan", lambda fx, d: order(fx, "--split", "nan,1,1"), ["--split 'nan,1,1'", "finite"]),
    ("order-split-inf", lambda fx, d: order(fx, "--split", "inf,1,1"), ["--split 'inf,1,1'", "finite"]),
    ("order-split-negative", lambda fx, d: order(fx, "--split=-1,2,3"), ["--split '-1,2,3'", ">= 0"]),
    ("order-weights-nan", lambda fx, d: order(fx, "--weights", "nan", "1", prefixes=2), ["--weights", "nan"]),
    ("order-weights-negative", lambda fx, d: order(fx, "--weights", "-1", "2", prefixes=2),
     ["--weights", "-1.0", ">= 0"]),
    ("eval-split-nan", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(fx["ds"]), "--split", "nan,1,1",
                                      "--output", S(d / "r.json")], ["--split 'nan,1,1'", "finite"]),
    ("train-split-nan", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set", "data.split=nan,1,1"],
     ["run.yaml", "data.split 'nan,1,1'"]),
    ("train-split-negative", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set",
                                            "data.split=-1,2,3"], ["run.yaml", "data.split '-1,2,3'", ">= 0"]),
    ("train-weights-nan", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), *blend_set(fx, "[.nan, 1]")],
     ["run.yaml", "data.train_weights", "nan"]),
    ("train-weights-negative", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"),
                                              *blend_set(fx, "[-1, 2]")], ["run.yaml", "data.train_weights", ">= 0"]),
    ("train-neox-yaml-split-inf", lambda fx, d: ["train", S(neox_train_cfg(fx, d, split="inf,1,1")), "--run-dir",
                                                 S(d / "r")], ["neox.yml", "split 'inf,1,1'"]),
    ("train-lr-inf", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set", "optimizer.lr=.inf"],
     ["run.yaml", "optimizer.lr", "finite"]),
    ("train-weight-decay-inf", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--set",
                                              "optimizer.weight_decay=.inf"], ["run.yaml", "optimizer.weight_decay"]),
    ("init-config-not-utf8", lambda fx, d: ["init", S(write(d, "m.yaml", b"model: {vocab_size: 64, hidden_size: 8, "
                                                                  b"num_layers: 1, num_heads: 2}\n# \xff\xfe\n")),
                                            S(d / "ck")], ["m.yaml", "UTF-8"]),
    ("train-config-not-utf8", lambda fx, d: ["train", S(write(d, "run.yaml", fx["run"].read_bytes() + b"# \xff\n")),
                                             "--run-dir", S(d / "r")], ["run.yaml", "UTF-8"]),
    # a key given twice (PyYAML keeps the last one, silently): refused naming the key and both lines
    ("init-config-duplicate-key", lambda fx, d: ["init", S(model_yaml(d, "model:\n  vocab_size: 64\n  hidden_size: 8\n"
                                                                "  num_layers: 1\n  num_heads: 2\n  hidden_size: 16\n")),
                                                 S(d / "ck")],
     ["m.yaml", "line 6", "key 'hidden_size' given twice (first on line 3)"]),
    ("train-config-duplicate-key", lambda fx, d: ["train", S(write(d, "run.yaml", fx["run"].read_bytes()
                                                                   + b"optimizer: {lr: 1.0}\n")),
                                                  "--run-dir", S(d / "r")], ["run.yaml", "key 'optimizer' given twice"]),
    ("train-neox-yaml-duplicate-key", lambda fx, d: ["train", S(write(d, "neox.yml", neox_train_cfg(fx, d).read_bytes()
                                                                      + b"train-iters: 5\n")), "--run-dir", S(d / "r")],
     ["neox.yml", "key 'train-iters' given twice"]),
    ("convert-neox-yaml-duplicate-key", lambda fx, d: ["convert", S(neox_dup_key(fx, d)), S(d / "dst")],
     ["model.yml", "key 'hidden-size' given twice"]),
    ("init-model-not-a-mapping", lambda fx, d: ["init", S(model_yaml(d, "model: 5\n")), S(d / "ck")],
     ["m.yaml", "model must be a mapping", "5"]),
    ("init-init-std-negative", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"), "--set",
                                              "model.init_std=-1"], ["init_std", "positive"]),
    ("init-tokenizer-vocab-size-negative", lambda fx, d: ["init", S(REPO / "configs" / "tiny.yaml"), S(d / "ck"),
                                                          "--set", "model.tokenizer_vocab_size=-1"],
     ["tokenizer_vocab_size", ">= 0"]),
    ("plan-device-memory-zero", lambda fx, d: ["plan", S(fx["run"]), "--devices", "8", "--device-memory", "0GB"],
     ["--device-memory '0GB'"]),
    # ---- an option typed where it has no effect (even at its default value): refused, naming both
    ("score-overwrite-without-output", lambda fx, d: ["score", S(fx["ck"]), "--input", S(fx["docs"]), "--overwrite"],
     ["score: --overwrite", "without --output"]),
    ("generate-overwrite-without-output", lambda fx, d: ["generate", S(fx["ck"]), "--prompt", "a", "--overwrite"],
     ["generate: --overwrite", "--output"]),
    ("generate-batch-size-interactive", lambda fx, d: ["generate", S(fx["ck"]), "--interactive", "--batch-size", "8"],
     ["--batch-size", "--interactive"]),
    ("generate-seed-greedy", lambda fx, d: ["generate", S(fx["ck"]), "--prompt", "a", "--seed", "0"],
     ["--seed", "--temperature 0"]),
    ("order-overwrite-without-output", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--num-samples",
                                                      "10", "--steps", "0", "--overwrite"],
     ["data order: --overwrite", "--output"]),
    ("order-decode-without-output", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--num-samples",
                                                   "10", "--steps", "0", "--decode"], ["--decode", "without --output"]),
    ("order-seed-preshuffled", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                              "--steps", "0", "--batch", "1", "--preshuffled", "--seed", "1234"],
     ["--seed", "--preshuffled"]),
    ("order-no-cache-preshuffled", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                                  "--steps", "0", "--batch", "1", "--preshuffled", "--no-cache"],
     ["--no-cache", "--preshuffled"]),
    ("order-save-index-maps-preshuffled", lambda fx, d: ["data", "order", "--data-prefix", S(copy_ds(fx, d)),
                                                         "--seq-length", "16", "--steps", "0", "--batch", "1",
                                                         "--preshuffled", "--save-index-maps"],
     ["--save-index-maps", "--preshuffled"]),
    ("order-weights-split", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                           "--num-samples", "10", "--steps", "0", "--batch", "1", "--split", "949,50,1",
                                           "--weights", "1", "--no-cache"], ["--weights", "--split"]),
    ("train-resume-fallback-no-resume", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--no-resume",
                                                       "--resume-fallback"], ["--resume-fallback", "--no-resume"]),
    ("train-resume-fallback-overwrite", lambda fx, d: ["train", S(fx["run"]), "--run-dir", S(d / "r"), "--overwrite",
                                                       "--resume-fallback"], ["--resume-fallback", "--overwrite"]),
    ("train-print-config-run-dir", lambda fx, d: ["train", S(fx["run"]), "--print-config", "--run-dir", S(d / "r")],
     ["--run-dir", "--print-config"]),
    ("eval-seed-without-tasks", lambda fx, d: ["eval", S(fx["ck"]), "--perplexity", S(fx["docs"]), "--seed", "0",
                                               "--output", S(d / "r.json")], ["eval: --seed", "--tasks"]),
    ("eval-context-data-prefix-only", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(fx["ds"]), "--context",
                                                     "16", "--output", S(d / "r.json")],
     ["--context", "--tasks, --lambada or --perplexity"]),
    ("preprocess-jsonl-key-txt-only", lambda fx, d: ["data", "preprocess", S(write(d, "a.txt", b"some text")),
                                                     "--output-prefix", S(d / "o"), "--tokenizer", S(fx["tok"]),
                                                     "--jsonl-key", "text"], ["--jsonl-key", ".txt"]),
    ("preprocess-strict-txt-only", lambda fx, d: ["data", "preprocess", S(write(d, "a.txt", b"some text")),
                                                  "--output-prefix", S(d / "o"), "--tokenizer", S(fx["tok"]),
                                                  "--strict"], ["--strict", ".txt"]),
    ("preprocess-txt-mode-jsonl-only", lambda fx, d: ["data", "preprocess", S(fx["text"]), "--output-prefix",
                                                      S(d / "o"), "--tokenizer", S(fx["tok"]), "--txt-mode", "file"],
     ["--txt-mode", ".txt"]),
    ("eval-tokenizer-data-prefix-only", lambda fx, d: ["eval", S(fx["ck"]), "--data-prefix", S(fx["ds"]),
                                                       "--tokenizer", S(fx["tok"]), "--output", S(d / "r.json")],
     ["--tokenizer", "--tasks, --lambada or --perplexity"]),
    ("convert-tp-one-not-neox", lambda fx, d: ["convert", S(fx["hf"]), S(d / "dst"), "--tp", "1"],
     ["--tp 1", "--to neox", "orbax"]),
    ("order-weights-one-prefix", lambda fx, d: ["data", "order", "--data-prefix", S(fx["ds"]), "--seq-length", "16",
                                                "--num-samples", "10", "--steps", "0", "--batch", "1", "--weights",
                                                "2", "--no-cache"], ["--weights 2.0", "one --data-prefix"]),
    ("tokenizer-model-type-bpe", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output", S(d / "t.json"),
                                                "--vocab-size", "300", "--model-type", "bpe"],
     ["--model-type", "BPE", "t.json"]),
    ("tokenizer-min-frequency-sentencepiece", lambda fx, d: ["data", "train-tokenizer", S(fx["text"]), "--output",
                                                             S(d / "t.model"), "--vocab-size", "300",
                                                             "--min-frequency", "2"],
     ["--min-frequency", "sentencepiece", "t.model"]),
]


def test_the_table_is_large_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 60
    commands = {c[0].split("-")[0] for c in CASES}
    assert {"score", "convert", "inspect", "diff", "preprocess", "order", "tokenizer", "train", "generate", "eval",
            "init"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, fx, tmp_path, capsys):
    name, build, needles = case
    d = tmp_path / "case"
    d.mkdir()
    argv = build(fx, d)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    err = [ln for ln in out.err.splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("neox-jax: error:")]
    assert rc == 2, (rc, out.err[-2000:])
    assert len(errors) == 1, err
    assert not any("Traceback" in ln for ln in err), out.err
    line = errors[0]
    assert "error: :" not in line, line  # an empty file name
    assert len(line) <= MAX_LINE, line
    for n in needles:
        assert n in line, (n, line)
    assert snapshot(tmp_path) == before, "the case directory changed (output touched or temporary left)"


def test_fixtures_untouched(fx):
    assert snapshot(fx["dir"]) == fx["before"]


def test_sigterm_while_reading_is_not_an_error(fx, monkeypatch, capsys):
    """SIGTERM (a batch scheduler's stop) while a checkpoint or tensor is being read: `errors.reading`
    turned the handler's exception into 'params: restore failed (Terminated)', exit 2; it is the
    interruption it is, exit 143."""
    import orbax.checkpoint as ocp

    from neox_jax.cli import _on_sigterm

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", lambda *a, **kw: _on_sigterm(15, None))
    capsys.readouterr()
    assert main(["-q", "score", str(fx["ck"]), "--input", str(fx["docs"])]) == 143
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == ["neox-jax: terminated"]
