"""Evaluation: the lm-eval-harness backend (`harness`, needs the `eval` extra), built-in LAMBADA and
perplexity evaluators (`builtin`), and the `neox-jax eval` command (`cli`).  Scoring itself is
`neox_jax.evaluate`."""
