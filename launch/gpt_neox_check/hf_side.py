"""HF-transformers side of check_gpt_neox.sh; runs in neox-jax's venv (.venv).

  make   OUT --parallel 0|1 --act gelu|gelu_fast [--tied 0|1] [--seed S]
         a tiny random fp32 GPTNeoXForCausalLM (hidden 128, 4 heads, 2 layers, rotary_pct 0.25,
         vocab 256, max_pos 64) saved with save_pretrained, plus a 256-token tokenizer.json
         (WordLevel; GPT-NeoX's HFTokenizer needs a vocab-file) and OUT/hf_logits.npy on tokens.npy.
  logits MODEL_DIR TOKENS OUT   fp32 eager logits of an HF directory (e.g. neox-jax's --to hf output)
  tokens OUT                    the fixed token batch (2 x 24, seed 1234, ids in [0, 256))

hidden 128 (not 64): GPT-NeoX HEAD rounds the MLP width up to a multiple of 512
(megatron/model/transformer.py ParallelMLP, multiple_of=256), so 4*64=256 would become 512 there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def tokens(out: str) -> None:
    rng = np.random.default_rng(1234)
    np.save(out, rng.integers(0, 256, size=(2, 24), dtype=np.int64))


def write_tokenizer(path: Path, n: int = 256) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1}
    vocab.update({f"t{i}": i for i in range(2, n)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(path))


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def make(out: str, parallel: bool, act: str, tied: bool, seed: int) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        rotary_pct=0.25, rotary_emb_base=10000.0, max_position_embeddings=64, hidden_act=act,
        use_parallel_residual=parallel, tie_word_embeddings=tied, initializer_range=0.1,
        bos_token_id=0, eos_token_id=0, layer_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms (as in tests/convert_fixtures.py)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "layernorm" in name or "layer_norm" in name:
                p.normal_(1.0, 0.1)
    path = Path(out)
    model.save_pretrained(path)
    write_tokenizer(path / "tokenizer.json")
    ids = np.load(path.parent / "tokens.npy")
    np.save(path / "hf_logits.npy", logits_of(model, ids))


def logits(model_dir: str, toks: str, out: str) -> None:
    from transformers import GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    np.save(out, logits_of(m, np.load(toks)))


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--parallel", type=int, default=1)
    m.add_argument("--act", default="gelu")
    m.add_argument("--tied", type=int, default=0)
    m.add_argument("--seed", type=int, default=0)
    lg = sub.add_parser("logits")
    lg.add_argument("model_dir")
    lg.add_argument("tokens")
    lg.add_argument("out")
    tk = sub.add_parser("tokens")
    tk.add_argument("out")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        make(a.out, bool(a.parallel), a.act, bool(a.tied), a.seed)
    elif a.cmd == "logits":
        logits(a.model_dir, a.tokens, a.out)
    else:
        tokens(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
