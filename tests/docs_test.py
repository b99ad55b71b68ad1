"""docs/params.md must describe the parameter tree the code builds."""

import re
from pathlib import Path

from neox_jax import model as M
from neox_jax.config import load_config
from neox_jax.train.optimizer import decay_mask

SYM = {"vocab": "V", "embed": "D", "embed_vec": "D", "heads": "N", "head_dim": "H", "qkv": "3", "mlp": "F", "layers": "L"}

# | `name` | [symbols] | (20B shape) | `logical axes` | decayed |
ROW = re.compile(r"^\| `([\w/]+)` \| \[([^\]]*)\] \| \(([\d, ]+)\) \| `([\w, ]+)` \| (yes|no) \|", re.M)


def _rows():
    text = (Path(__file__).resolve().parents[1] / "docs" / "params.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    rows = ROW.findall(text)
    assert len(rows) == len(table), "a table row does not have the documented columns"
    return rows


def test_params_table_matches_code():
    rows = _rows()
    cfg = load_config("neox-20b")
    shapes = M.flatten(M.abstract_params(cfg))
    axes = M.flatten(M.param_axes(cfg))
    assert {r[0] for r in rows} == set(shapes)
    for name, sym, shape, ax, _ in rows:
        assert tuple(a.strip() for a in ax.split(",")) == axes[name], name
        assert [s.strip() for s in sym.split(",")] == [SYM[a] for a in axes[name]], name
        assert tuple(int(x) for x in shape.replace(" ", "").strip(",").split(",")) == shapes[name].shape, name


def test_params_table_decayed_column_matches_decay_mask():
    """The "decayed" column is what the optimizer's mask does to the real parameter tree (untied, as
    every NeoX/Pythia model; tied, the same minus embed_out)."""
    rows = {name: decayed == "yes" for name, *_, decayed in _rows()}
    for cfg in (load_config("neox-20b"), load_config("pythia-14m").replace(tie_word_embeddings=True)):
        mask = M.flatten(decay_mask(M.abstract_params(cfg)))
        assert set(mask) <= set(rows)
        assert {n: bool(mask[n]) for n in mask} == {n: rows[n] for n in mask}, cfg.num_layers
    # and GPT-NeoX's groups as the doc states them: biases and LayerNorm parameters undecayed
    assert rows["embed_in/embedding"] and rows["embed_out/kernel"]
    assert not any(rows[n] for n in rows if n.endswith("/bias") or "_ln/" in n or "/ln_" in n)
