"""lm-evaluation-harness backend `neox-jax` (an `lm_eval.api.model.TemplateLM`).

Importing this module registers the backend, so after `import neox_jax.eval.harness`:

    lm_eval.simple_evaluate(model="neox-jax", model_args="checkpoint=CKPT,dtype=bfloat16", tasks=[...])

lm-eval 0.4's own `lm_eval` command has no plugin discovery, so `neox-jax-lm-eval ...` (or
`python -m neox_jax.eval.harness ...`) is that command with the backend registered:
`neox-jax-lm-eval --model neox-jax --model_args checkpoint=CKPT --tasks lambada_openai`.
`neox-jax eval CKPT --tasks ...` runs the same through our CLI.

The requests are answered as lm-eval's `hf` backend answers them, so the numbers compare:
  * tokenisation is TemplateLM's (trailing context spaces move to the continuation; an empty
    context becomes the end-of-text token); no BOS is added (GPT-NeoX tokenizers have none);
  * loglikelihood: `(context + continuation)[-(max_length + 1):][:-1]` is scored, longest first,
    by `evaluate.score_continuations`;
  * loglikelihood_rolling: lm-eval's own rolling windows (prefix = end-of-text, context_len 1);
  * generate_until: contexts left-truncated to `max_length - max_gen_toks`, KV-cached decoding
    (`generate.Generator`), stopping at end-of-text or an `until` string, the text decoded without
    special tokens and cut before the first `until` string.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval registers its own backends only while its registry is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..errors import UserError

log = logging.getLogger(__name__)

MODEL_ARGS = ("checkpoint", "tokenizer", "dtype", "batch_size", "max_length", "max_gen_toks", "tensor", "seed")


@register_model("neox-jax")
class NeoxJaxLM(TemplateLM):
    """model_args: checkpoint (required), tokenizer (default: the 20B tokenizer), dtype
    (float32|bfloat16), batch_size, max_length (default: the model's context), max_gen_toks (256),
    tensor (tensor-parallel devices), seed (for tasks that sample)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "NeoxJaxLM":
        """lm-eval's, except that a key given both in model_args and by lm-eval's own options (its
        command line always passes batch_size) is taken from model_args, and logged: the two clashed
        in a TypeError with a traceback (`--model_args checkpoint=C,batch_size=16`)."""
        from lm_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for k in sorted(set(args) & set(extra)):
            log.info("neox-jax backend: %s=%s from model_args (lm-eval's option gave %s)", k, args[k], extra.pop(k))
        return cls(**args, **extra)

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 8, max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 tensor: int | str = 1, seed: int | str = 0, *, generator=None, device: str | None = None,
                 max_batch_size: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"neox-jax backend: unknown model_args {sorted(unknown)} (known: {list(MODEL_ARGS)})")
        from ..data.tokenizer import load_tokenizer
        from ..generate import load_generator

        if generator is None and not checkpoint:
            raise UserError("neox-jax backend: model_args needs checkpoint=CKPT")
        try:
            self._batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"neox-jax backend: batch_size must be an integer, got {batch_size!r}") from None
        if device is not None:
            import jax

            log.info("lm-eval device=%s is not used: JAX runs on %s", device, jax.devices())
        if generator is None:
            tok = load_tokenizer(tokenizer)
            generator = load_generator(checkpoint, dtype=dtype, tensor=int(tensor), tokenizer=tok)
        self.gen = generator
        self.tok = generator.tokenizer
        if self.tok is None:
            raise UserError("neox-jax backend: the generator needs a tokenizer")
        self.cfg = generator.cfg
        self._max_length = int(max_length) if max_length else self.cfg.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self._seed = int(seed)
        self.checkpoint = checkpoint

    # --- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if self.tok.kind == "hf":
            return self.tok._tok.decode([int(t) for t in tokens], skip_special_tokens=skip_special_tokens)
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_checkpoint": str(self.checkpoint), "model_num_parameters": self.cfg.num_params(),
                "model_dtype": self.cfg.compute_dtype}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from ..evaluate import score_continuations
        from ..generate import mesh_context

        with mesh_context(self.gen.mesh):
            out = score_continuations(self.cfg, self.gen.params, [(r[1], r[2]) for r in requests],
                                      batch_size=self.batch_size, window=self.max_length,
                                      progress=not disable_tqdm and sys.stderr.isatty())
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from ..generate import Sampling, mesh_context

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for key, idx in groups.items():
            kw = dict(normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks))
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = kw.pop("max_gen_toks")
            do_sample = kw.pop("do_sample", False)
            temperature = float(kw.pop("temperature", 0.0))
            top_k = int(kw.pop("top_k", 0) or 0)
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            if kw:
                raise UserError(f"neox-jax backend: unsupported generation kwargs {sorted(kw)} (task gen_kwargs {key})")
            sampling = Sampling(temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p)
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise UserError(f"neox-jax backend: max_gen_toks {max_gen} leaves no context in max_length "
                                f"{self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] or [self.prefix_token_id] for i in idx]
            with mesh_context(self.gen.mesh):
                res = self.gen.generate(prompts, max_new_tokens=max_gen, sampling=sampling, seed=self._seed,
                                        stop_tokens=[self.eot_token_id], stop_strings=[s for s in until if s != eos],
                                        batch_size=self.batch_size, progress=not disable_tqdm and sys.stderr.isatty())
            for i, r in zip(idx, res):
                text = self.tok_decode(r.completion_tokens)
                for term in until:
                    if term:
                        text = text.split(term)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's own command line with the `neox-jax` backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
