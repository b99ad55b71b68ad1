"""Hugging Face `GPTNeoXForCausalLM` checkpoints: streaming reader and writer.

Reader.  `config.json` (old `rotary_pct` keys or the transformers-5 `rope_parameters` form) gives
the config; weights come from `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json`, or `pytorch_model*.bin` (with its index when sharded).  Safetensors
headers are parsed here (so a truncated file is caught before anything is written) and each tensor
is read with one positioned read of exactly its bytes: nothing is memory-mapped, so the resident
set holds one tensor.  `.bin` files go through `torch.load(weights_only=True, mmap=True)`; touched
pages of a mapping count as resident, so one file is mapped at a time and unmapped whenever
128 MiB have been read through the mapping.  Buffers of older checkpoints (`attention.bias`,
`attention.masked_bias`, `attention.rotary_emb.inv_freq`) are ignored.

Writer.  Every tensor's name, shape and dtype is known before the first byte arrives, so each
safetensors shard's header is written first and tensors are then written at their offsets as they
stream in (any order).  Shards split at `max_shard_size` (default 5 GB) in the usual HF order, with
`model.safetensors.index.json` when there is more than one.  `config.json` comes from
`config.to_hf_config`; tokenizer files of the source are copied.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from ..config import ModelConfig, from_hf_config, to_hf_config
from ..errors import CheckpointError, ConfigError
from .formats import Entry, NativeTensor, Reader, Writer, check_slice, torch_dtype_np, torch_load, torch_to_numpy
from .mapping import HF_IGNORED_SUFFIXES, LAYER_MAP, hf_name, our_entries, to_ours, torch_shape
from ..values import Fields

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model", "generation_config.json",
)
HF_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

BIN_REMAP_BYTES = 128 * 2**20

ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


# ----------------------------------------------------------------------------- names and shapes


def hf_order(entries: list[Entry]) -> list[Entry]:
    """HF's state-dict order: embed_in, layers 0..L-1, final LN, embed_out."""
    rank = {"embed_in/embedding": 0, "final_ln/scale": 2, "final_ln/bias": 3, "embed_out/kernel": 4}
    suffix_rank = {f"layers/{n}": i for i, n in enumerate(LAYER_MAP)}
    return sorted(entries, key=lambda e: (rank.get(e.name, 1), e.layer if e.layer is not None else -1,
                                          suffix_rank.get(e.name, 0)))


# ----------------------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor key -> {dtype, shape, data_offsets}, absolute offset of the data buffer), validated
    against the file size so that a truncated file fails here, naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    spans = []
    for key, info in header.items():
        try:
            dt = ST_DTYPES[info["dtype"]]
            start, stop = info["data_offsets"]
            shape = tuple(info["shape"])
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, stop, *shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key}: unsupported or malformed header entry "
                                  f"{str(info)[:120]}") from None
        nbytes = math.prod(shape) * dt.itemsize
        if stop < start or stop - start != nbytes:
            raise CheckpointError(f"{path}: tensor {key}: data_offsets [{start}, {stop}) span {stop - start} bytes, "
                                  f"but {info['dtype']}{list(shape)} needs {nbytes}")
        spans.append((start, stop, key))
    # as the format's own reader: the tensors tile the data buffer exactly, in offset order
    spans.sort()
    end, prev = 0, None
    for start, stop, key in spans:
        if start < end:
            raise CheckpointError(f"{path}: tensor {key} (bytes [{start}, {stop})) overlaps tensor {prev} "
                                  f"(ends at {end}): corrupt header")
        if start > end:
            raise CheckpointError(f"{path}: bytes [{end}, {start}) of the data belong to no tensor "
                                  f"(before {key}): corrupt header")
        end, prev = stop, key
    if base + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header says {base + end}); re-download it"
        )
    if base + end < size:
        raise CheckpointError(f"{path}: {size - base - end} bytes after the last tensor that no header entry "
                              f"covers (file {size} bytes, header says {base + end}): corrupt or mixed file")
    return header, base


def _read_at(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(offset)
        arr = np.fromfile(f, dtype=dtype, count=count)
    if arr.size != count:
        raise CheckpointError(f"{path}: truncated while reading a tensor at offset {offset}")
    return arr.reshape(shape)


# ----------------------------------------------------------------------------- reader


def _with_tokenizer_vocab(cfg: ModelConfig, tokenizer_json: Path) -> ModelConfig:
    """`cfg` with `tokenizer_vocab_size` from the checkpoint's own tokenizer.json (its vocabulary with
    the added tokens: 50277 for Pythia and 20B), which HF's config.json does not carry: without it
    `generate` could draw the embedding's padding rows (ids 50277..50303), which decode to nothing."""
    if cfg.tokenizer_vocab_size or not tokenizer_json.is_file():
        return cfg
    from tokenizers import Tokenizer

    try:
        n = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
        # the weights convert all the same (the file is copied as it is); said, not silent
        log.warning("%s: not a tokenizer the tokenizers library reads (%s); tokenizer_vocab_size not set: every "
                    "row of the embedding may be sampled", tokenizer_json, (str(e).splitlines() or [""])[0][:200])
        return cfg
    if n > cfg.vocab_size:
        raise ConfigError(f"{tokenizer_json}: {n} tokens, more than the model's vocab_size {cfg.vocab_size}")
    log.info("%s: tokenizer of %d tokens (the model's vocab_size is %d): tokenizer_vocab_size %d",
             tokenizer_json, n, cfg.vocab_size, n)
    return cfg.replace(tokenizer_vocab_size=n)


class HFReader(Reader):
    fmt = "hf"

    def __init__(self, path: Path):
        super().__init__(path)
        cfg_path = path / "config.json"
        try:
            hf_cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{cfg_path}: unreadable ({e.__class__.__name__})") from None
        if not isinstance(hf_cfg, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object")
        self.hf_config = hf_cfg
        self.config = from_hf_config(hf_cfg, where=str(cfg_path))
        dt = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
        f = Fields(hf_cfg, str(cfg_path))  # token ids are copied to outputs: int, list of ints or null
        self.extras["hf_token_ids"] = {k: f.list(k, int) if isinstance(hf_cfg[k], list) else f.int(k, None, nullable=True)
                                       for k in HF_TOKEN_ID_KEYS if k in hf_cfg}
        self.extras["tokenizer_files"] = {f: str(path / f) for f in TOKENIZER_FILES if (path / f).is_file()}
        self.config = _with_tokenizer_vocab(self.config, path / "tokenizer.json")
        self._st: dict[str, tuple[Path, int, np.dtype, tuple[int, ...]]] = {}  # key -> file, abs offset, ...
        self._bin: dict[str, tuple[Path, tuple[int, ...], np.dtype]] = {}  # key -> (file, shape, dtype)
        self._bin_open: tuple[Path, dict] | None = None  # the one memory-mapped .bin file in use
        self._bin_touched = 0  # bytes read from it since it was mapped
        self._files = self._weight_files()
        self._index_tensors()
        self._entries = self._check_tensors()
        log.debug("%s: HF checkpoint, config dtype %s", path, dt)

    # -- discovery
    def _weight_files(self) -> list[Path]:
        p = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            idx = p / index_name
            if idx.exists():
                try:
                    wm = json.loads(idx.read_text())["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{idx}: unreadable index ({e.__class__.__name__})") from None
                files = sorted(set(wm.values()))
                for f in files:
                    if not (p / f).is_file():
                        raise CheckpointError(f"{idx}: lists {f}, which is missing")
                self._weight_map = wm
                return [p / f for f in files]
        self._weight_map = None
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                return [p / single]
        shards = sorted(p.glob("model-*-of-*.safetensors")) or sorted(p.glob("pytorch_model-*-of-*.bin"))
        if shards:
            raise CheckpointError(f"{p}: sharded weights ({shards[0].name}, ...) without their index .json")
        raise CheckpointError(f"{p}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _index_tensors(self) -> None:
        for f in self._files:
            if f.suffix == ".safetensors":
                header, base = read_safetensors_header(f)
                for key, info in header.items():
                    self._no_duplicate(key, f)
                    self._st[key] = (f, base + info["data_offsets"][0], ST_DTYPES[info["dtype"]],
                                     tuple(info["shape"]))
            else:
                for key, t in self._load_bin(f).items():
                    if hasattr(t, "shape"):
                        self._no_duplicate(key, f)
                        self._bin[key] = (f, tuple(t.shape), torch_dtype_np(t))
        if self._weight_map is not None:
            have = set(self._st) | set(self._bin)
            for key, fname in self._weight_map.items():
                if key not in have:
                    raise CheckpointError(f"{self.path / fname}: index says it holds {key}, but it does not")

    def _no_duplicate(self, key: str, f: Path) -> None:
        if key in self._st or key in self._bin:
            raise CheckpointError(f"tensor {key} is in both {self._file_of(key)} and {f}: which one is meant?")

    def _keys(self) -> set[str]:
        return set(self._st) | set(self._bin)

    def _shape_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        if key in self._st:
            _, _, dt, shape = self._st[key]
            return shape, dt
        _, shape, dt = self._bin[key]
        return shape, dt

    def _file_of(self, key: str) -> Path:
        return self._st[key][0] if key in self._st else self._bin[key][0]

    def _check_tensors(self) -> list[Entry]:
        cfg = self.config
        keys = self._keys()
        self._key_of: dict[tuple[str, int | None], str] = {}
        entries = []
        for e in our_entries(cfg):
            key = hf_name(e.name, e.layer)
            if key == "embed_out.weight" and key not in keys and "lm_head.weight" in keys:
                key = "lm_head.weight"
            if key not in keys:
                raise CheckpointError(f"{self.path}: tensor {key} is missing (config.json implies "
                                      f"{cfg.num_layers} layers{'' if cfg.tie_word_embeddings else ', untied embed_out'})")
            shape, dt = self._shape_dtype(key)
            want = torch_shape(e.name, cfg)
            if shape != want:
                raise CheckpointError(f"{self._file_of(key)}: tensor {key} has shape {shape}, config.json implies {want}")
            if dt.kind != "f" and dt != np.dtype(ml_dtypes.bfloat16):
                raise CheckpointError(f"{self._file_of(key)}: tensor {key} has dtype {dt}, expected a float type")
            self._key_of[(e.name, e.layer)] = key
            entries.append(e.with_dtype(dt))
        used = set(self._key_of.values())
        for key in sorted(keys - used):
            if key.endswith(HF_IGNORED_SUFFIXES) or key.endswith("rotary_emb.inv_freq"):
                continue
            if cfg.tie_word_embeddings and key in ("embed_out.weight", "lm_head.weight"):
                raise CheckpointError(f"{self._file_of(key)}: unexpected tensor {key}: config.json says "
                                      "tie_word_embeddings: true (no separate output layer); fix one of them")
            raise CheckpointError(f"{self._file_of(key)}: unexpected tensor {key} (not part of a "
                                  f"{cfg.num_layers}-layer GPTNeoXForCausalLM per config.json)")
        return entries

    # -- data
    def _raw(self, key: str) -> np.ndarray:
        if key in self._st:
            f, off, dt, shape = self._st[key]
            return _read_at(f, off, dt, shape)
        f = self._bin[key][0]
        # Pages of a memory-mapped file count as resident once touched: the mapping is dropped
        # (unmapped) as soon as BIN_REMAP_BYTES have been read through it, so the resident set
        # stays bounded; the next read maps the file again (only its pickle is parsed).
        if self._bin_open is None or self._bin_open[0] != f:
            self._bin_open = None
            self._bin_open = (f, self._load_bin(f))
            self._bin_touched = 0
        t = self._bin_open[1][key]
        self._bin_touched += t.numel() * t.element_size()
        out = torch_to_numpy(t)
        del t
        if self._bin_touched > BIN_REMAP_BYTES:
            self._bin_open = None
        return out

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def read(self, entry: Entry) -> np.ndarray:
        out = to_ours(entry.name, self.read_torch(entry), self.config)
        check_slice(entry, out, str(self.path))
        return out

    def read_torch(self, entry: Entry) -> np.ndarray:
        key = self._key_of[(entry.name, entry.layer)]
        return self._raw(key)

    def native_tensors(self) -> Iterator[NativeTensor]:
        for key in sorted(self._keys(), key=_natural_key):
            shape, dt = self._shape_dtype(key)
            yield key, shape, dt, (lambda k=key: self._raw(k))

    def _load_bin(self, f: Path) -> dict:
        sd = torch_load(f, mmap=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: not a state dict")
        return sd

    def close(self) -> None:
        self._bin_open = None


def _natural_key(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


# ----------------------------------------------------------------------------- writer


class HFWriter(Writer):
    fmt = "hf"
    layout = "torch"

    def __init__(self, tmp: Path, cfg: ModelConfig, entries: list[Entry], *, max_shard_size: int = 5 * 10**9,
                 extras: dict | None = None):
        self.tmp, self.cfg = tmp, cfg
        self.extras = extras or {}
        ordered = hf_order(entries)
        shards: list[list[Entry]] = [[]]
        size = 0
        for e in ordered:
            if shards[-1] and size + e.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        self.files: list[Path] = []
        self.where: dict[tuple[str, int | None], tuple[int, int, Entry]] = {}  # -> (file idx, abs offset, entry)
        self.weight_map: dict[str, str] = {}
        self.fds: list[int] = []
        for si, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{si + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for e in shard:
                key = hf_name(e.name, e.layer)
                header[key] = {"dtype": ST_CODES[np.dtype(e.dtype)], "shape": list(torch_shape(e.name, cfg)),
                               "data_offsets": [off, off + e.nbytes]}
                off += e.nbytes
                self.weight_map[key] = fname
            hbytes = json.dumps(header, separators=(",", ":")).encode()
            hbytes += b" " * (-len(hbytes) % 8)
            base = 8 + len(hbytes)
            path = tmp / fname
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(hbytes)) + hbytes)
            os.ftruncate(fd, base + off)
            for e in shard:
                key = hf_name(e.name, e.layer)
                self.where[(e.name, e.layer)] = (len(self.fds), base + header[key]["data_offsets"][0], e)
            self.fds.append(fd)
            self.files.append(path)
        self.total_size = sum(e.nbytes for e in entries)
        self.pending = set(self.where)

    def write(self, entry: Entry, array: np.ndarray) -> None:
        """array: torch layout (HF key's shape)."""
        fi, off, planned = self.where[(entry.name, entry.layer)]
        t = np.ascontiguousarray(array)
        if t.dtype != planned.dtype or tuple(t.shape) != torch_shape(entry.name, self.cfg):
            raise CheckpointError(f"HF writer: tensor {entry.label} came as {t.dtype}{tuple(t.shape)}, planned "
                                  f"{planned.dtype}{torch_shape(entry.name, self.cfg)}")
        buf = memoryview(t.reshape(-1).view(np.uint8))
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fds[fi], buf[done:], off + done)
        self.pending.discard((entry.name, entry.layer))

    def finish(self) -> None:
        for fd in self.fds:
            os.close(fd)  # synced with the rest of DST before it is published (atomic.sync_tree)
        self.fds = []
        if self.pending:
            first = sorted(self.pending, key=str)[0]
            raise CheckpointError(f"HF writer: {len(self.pending)} tensors never arrived (first: {first})")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtypes = {np.dtype(e.dtype).name for _, _, e in self.where.values()}
        dt = dtypes.pop() if len(dtypes) == 1 else "float32"
        hf = hf_config_dict(self.cfg, dt, self.extras.get("hf_token_ids") or {})
        (self.tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        for name, f in (self.extras.get("tokenizer_files") or {}).items():
            shutil.copy2(f, self.tmp / name)

    def abort(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def hf_config_dict(cfg: ModelConfig, dtype: str, token_ids: dict | None = None) -> dict:
    """config.json for transformers 4.x and 5.x: `torch_dtype` (4.x) and `dtype` (5.x) both set."""
    hf = to_hf_config(cfg, torch_dtype=dtype)
    hf["dtype"] = dtype
    for k, v in (token_ids or {}).items():
        hf[k] = v
    return hf
