"""Typed reads of values from files we did not write: the one place foreign config values are checked.

Hugging Face `config.json`, GPT-NeoX YAML, a checkpoint's `neox_jax.json` and `config.json` are read
through `Fields`, which never converts with Python truthiness or `int()`/`float()`: a boolean must be a
real boolean (`"no"` and `0` are refused), a number a real number (`null`, `"abc"`, `true` and NaN are
refused), a mapping a mapping.  A wrong value raises `ConfigError` naming the file and the key:

    f = Fields(hf_dict, "ckpt/config.json")
    eps = f.float("layer_norm_eps", 1e-5)       # absent -> 1e-5; null or "abc" -> ConfigError
    tied = f.bool("tie_word_embeddings", False)  # "no" -> ConfigError
    rope = f.mapping("rope_parameters", {})      # "x" -> ConfigError

`nullable=True` lets an explicit `null` mean the default, for keys whose writers use null that way
(GPT-NeoX's `padded-vocab-size`, HF's `rope_scaling`).

Values with a range of their own: `check_seed` (and `seed_option`, a `--seed` option's argparse type),
`check_weights` (blend weights), `check_split` (GPT-NeoX's `split` string, e.g. "969,30,1").
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Mapping

_MISSING = object()


def _error(msg: str) -> Exception:
    from .config import ConfigError  # config imports this module; the error class lives there

    return ConfigError(msg)


def describe(v: Any) -> str:
    return "null" if v is None else repr(v)


def check_int(v: Any, name: str) -> int:
    """An int (an integral float such as 2048.0 is accepted), never a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _error(f"{name} must be an integer, got {describe(v)}")
    return int(v)


# YAML 1.2 / JSON floats such as `1e-06` that PyYAML (YAML 1.1) reads as strings
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def check_float(v: Any, name: str) -> float:
    """A finite int or float (or a YAML 1.2 exponent float like '1e-06'), never a bool or other string."""
    if isinstance(v, str) and _EXP_FLOAT.match(v):
        v = float(v.replace("_", ""))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(_to_float(v)):
        raise _error(f"{name} must be a finite number, got {describe(v)}")
    return float(v)


def _to_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond float's range
        return math.inf


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise _error(f"{name} must be true or false, got {describe(v)}")
    return v


def check_str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise _error(f"{name} must be a string, got {describe(v)}")
    return v


# numpy's RandomState (the data order) takes seeds in [0, 2**32 - 1]; a JAX key (parameter init,
# sampling) keeps only a seed's low 32 bits, so larger seeds would repeat smaller ones
SEED_MAX = 2**32 - 1


def check_seed(v: Any, name: str) -> int:
    v = check_int(v, name)
    if not 0 <= v <= SEED_MAX:
        raise _error(f"{name} must be in [0, 2**32 - 1], got {v}")
    return v


def seed_option(text: str) -> int:
    """The argparse `type` of a `--seed` option: an int in [0, 2**32 - 1]."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 2**32 - 1]")
    return v


def _weights(v: list | tuple) -> list[float] | None:
    """v as floats when every one is a finite number >= 0 and their sum is positive and finite."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return None
    w = [_to_float(x) for x in v]
    return w if all(0 <= x < math.inf for x in w) and 0 < sum(w) < math.inf else None


def check_weights(v: Any, name: str) -> list[float]:
    """Blend weights: finite numbers >= 0, not all zero (each is divided by their sum)."""
    if not isinstance(v, (list, tuple)):
        raise _error(f"{name} must be a list, got {describe(v)}")
    w = _weights(v)
    if w is None:
        raise _error(f"{name} {describe(list(v))}: weights must be finite numbers >= 0, not all zero")
    return w


def check_split(v: Any, name: str) -> list[float]:
    """GPT-NeoX's `split` string, "969,30,1" or "969/30/1": train, valid and test weights (finite, >= 0, not
    all zero); missing ones are 0 and more than three are ignored, as in GPT-NeoX's
    `get_train_valid_test_split_`."""
    text = check_str(v, name)
    sep = "," if "," in text else "/" if "/" in text else None
    try:
        splits = [float(s) for s in (text.split(sep) if sep else [text])]
    except ValueError:
        raise _error(f"{name} {text!r}: expected numbers like 995,4,1") from None
    w = _weights((splits + [0.0, 0.0])[:3])
    if w is None or _weights(splits) is None:
        raise _error(f"{name} {text!r}: weights must be finite numbers >= 0, not all zero")
    return w


CHECKS = {int: check_int, float: check_float, bool: check_bool, str: check_str}


class Fields:
    """Typed access to one foreign mapping; errors read '{where}: {prefix}{key} must be ...'."""

    def __init__(self, data: Any, where: str, prefix: str = ""):
        if not isinstance(data, Mapping):
            raise _error(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {describe(data)}")
        self.data, self.where, self.prefix = data, where, prefix

    def name(self, key: str) -> str:
        return f"{self.where}: {self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any, nullable: bool, check) -> Any:
        if key not in self.data or (nullable and self.data[key] is None):
            if default is _MISSING:
                raise _error(f"{self.where}: missing key {self.prefix}{key!r}")
            return default
        return check(self.data[key], self.name(key))

    def int(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> int:
        return self._get(key, default, nullable, check_int)

    def float(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> float:
        return self._get(key, default, nullable, check_float)

    def bool(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> bool:
        return self._get(key, default, nullable, check_bool)

    def str(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> str:
        return self._get(key, default, nullable, check_str)

    def mapping(self, key: str, default: Any = _MISSING, *, nullable: bool = False) -> dict:
        def check(v, name):
            if not isinstance(v, Mapping):
                raise _error(f"{name} must be a mapping, got {describe(v)}")
            return dict(v)

        return self._get(key, default, nullable, check)

    def sub(self, key: str, *, nullable: bool = True) -> "Fields":
        """The nested mapping at `key` (absent or null: empty) as Fields, its keys named 'key.sub'."""
        return Fields(self.mapping(key, {}, nullable=nullable), self.where, f"{self.prefix}{key}.")

    def list(self, key: str, item: type, default: Any = _MISSING, *, nullable: bool = False) -> list:
        def check(v, name):
            if not isinstance(v, (list, tuple)):
                raise _error(f"{name} must be a list, got {describe(v)}")
            return [CHECKS[item](x, f"{name}[{i}]") for i, x in enumerate(v)]

        return self._get(key, default, nullable, check)
