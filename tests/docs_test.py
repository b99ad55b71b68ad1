"""docs/params.md must describe the parameter tree the code builds."""

import re
from pathlib import Path

from neox_jax import model as M
from neox_jax.config import load_config

SYM = {"vocab": "V", "embed": "D", "embed_vec": "D", "heads": "N", "head_dim": "H", "qkv": "3", "mlp": "F", "layers": "L"}


def test_params_table_matches_code():
    text = (Path(__file__).resolve().parents[1] / "docs" / "params.md").read_text()
    rows = re.findall(r"^\| `([\w/]+)` \| \[([^\]]*)\] \| \(([\d, ]+)\) \| `([\w, ]+)` \|", text, re.M)
    cfg = load_config("neox-20b")
    shapes = M.flatten(M.abstract_params(cfg))
    axes = M.flatten(M.param_axes(cfg))
    assert {r[0] for r in rows} == set(shapes)
    for name, sym, shape, ax in rows:
        assert tuple(a.strip() for a in ax.split(",")) == axes[name], name
        assert [s.strip() for s in sym.split(",")] == [SYM[a] for a in axes[name]], name
        assert tuple(int(x) for x in shape.replace(" ", "").strip(",").split(",")) == shapes[name].shape, name
