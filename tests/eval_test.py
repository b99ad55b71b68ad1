"""Evaluation: the `neox-jax` lm-eval backend against lm-eval's own `hf` backend on the same random
model (built locally, converted with our converter), the built-in LAMBADA/perplexity evaluators,
and `neox-jax eval`.  Offline: local task YAMLs over JSONL files; nothing is downloaded."""

import json
import math
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hf_reference import hf_model, ours_from_hf  # noqa: E402
from neox_jax import checkpoint as C  # noqa: E402
from neox_jax.cli import main  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # installed by the test set-up (the `eval` extra)

CONTEXT = 96  # small, so rolling windows and truncation happen

TASKS = {
    "lambada_local": """
task: lambada_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{d}/lambada.jsonl"}}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "piqa_local": """
task: piqa_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{d}/piqa.jsonl"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""",
    "rolling_local": """
task: rolling_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{d}/docs.jsonl"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity}}
  - {{metric: byte_perplexity}}
  - {{metric: bits_per_byte}}
""",
    "gen_local": """
task: gen_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{d}/gen.jsonl"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [".", "\\n\\n"], max_gen_toks: 12, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, neox_tokenizer_path, shakespeare):
    """A random 50304-vocabulary HF model saved with its tokenizer, our converted checkpoint, and
    four local tasks.  Half of the LAMBADA documents end with the model's own greedy word (so
    accuracy is neither 0 nor 1)."""
    from transformers import PreTrainedTokenizerFast

    from neox_jax.convert.stream import convert
    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.generate import generate

    root = tmp_path_factory.mktemp("eval")
    model = hf_model(seed=21, vocab=50304, hidden=64, heads=4, layers=2, max_pos=CONTEXT)
    model.config.bos_token_id = model.config.eos_token_id = 0
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
    model.config.pad_token_id = model.generation_config.pad_token_id = 1
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_path), bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|padding|>")
    hf_tok.save_pretrained(hf_dir)
    ck = root / "ck"
    convert(str(hf_dir), str(ck))

    tok = load_tokenizer(neox_tokenizer_path)
    cfg, params = C.load_params(ck)
    lines = [ln.strip() for ln in shakespeare.splitlines() if len(ln.split()) >= 6][:40]
    # documents ending with the model's greedy continuation, then plain Shakespeare lines
    prompts = [tok.encode(line) for line in lines[:8]]
    cont = generate(cfg, params, prompts, max_new_tokens=6, batch_size=8)
    greedy_docs = [line + tok.decode(c.completion_tokens) for line, c in zip(lines[:8], cont)]
    lambada = [d for d in greedy_docs if " " in d.strip() and not d.endswith(" ")][:6] + lines[8:14]
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada))
    rs = np.random.RandomState(0)
    piqa = [{"goal": lines[14 + i], "sol1": lines[20 + i], "sol2": lines[26 + i], "label": int(rs.randint(2))}
            for i in range(6)]
    (root / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    text = shakespeare[:6000]
    docs = [text[:80], text[100:900], text[1000:1400] + "\n\n" + text[2000:2300]]  # the long ones need windows
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    gen = [{"prompt": lines[32 + i], "answer": " x"} for i in range(4)]
    gen.append({"prompt": text[2000:2600], "answer": " x"})  # left-truncated to CONTEXT - max_gen_toks
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(body.format(d=root))
    return dict(root=root, hf_dir=hf_dir, ck=ck, tasks=tasks, tok=tok, cfg=cfg, params=params, model=model,
                lambada=lambada, tokenizer_path=neox_tokenizer_path)


def _evaluate(model, model_args, setup, tasks):
    from lm_eval.tasks import TaskManager

    import neox_jax.eval.harness  # noqa: F401  (registers "neox-jax")

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4, device="cpu",
                                   task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
                                   log_samples=True)  # lm-eval's own ~10k task files: 10 s to index, unused


@pytest.fixture(scope="module")
def both(setup):
    tasks = list(TASKS)
    hf = _evaluate("hf", f"pretrained={setup['hf_dir']},dtype=float32", setup, tasks)
    # batch_size in model_args as well as lm-eval's own (4, below): model_args wins (a TypeError before)
    ours = _evaluate("neox-jax", f"checkpoint={setup['ck']},tokenizer={setup['tokenizer_path']},batch_size=3", setup,
                     tasks)
    return hf, ours


def test_harness_backend_equals_hf_backend(both, record_property):
    hf, ours = both
    worst_ll, worst_rel = 0.0, 0.0  # per request; rolling sums span hundreds of tokens: relative
    for task in TASKS:
        a, b = hf["samples"][task], ours["samples"][task]
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b):
            assert sa["doc_id"] == sb["doc_id"]
            for ra, rb in zip(sa["resps"], sb["resps"]):
                ra, rb = ra[0], rb[0]
                if task == "gen_local":
                    assert ra == rb, (task, ra, rb)
                elif task == "rolling_local":
                    worst_rel = max(worst_rel, abs(ra - rb) / abs(ra))
                else:
                    assert ra[1] == rb[1], (task, ra, rb)  # is_greedy
                    worst_ll = max(worst_ll, abs(ra[0] - rb[0]))
        ma, mb = hf["results"][task], ours["results"][task]
        for metric, va in ma.items():
            if isinstance(va, float) and "stderr" not in metric:
                if metric.startswith(("acc", "exact_match")):
                    assert va == mb[metric], (task, metric, va, mb[metric])
                else:
                    assert mb[metric] == pytest.approx(va, rel=1e-4), (task, metric)
    record_property("measured", f"lm-eval neox-jax vs hf backend: max|d loglikelihood| {worst_ll:.1e} (tolerance 1e-4), "
                                f"rolling max relative {worst_rel:.1e} (1e-6); "
                                f"lambada acc {ours['results']['lambada_local']['acc,none']:.3f}, "
                                f"piqa acc {ours['results']['piqa_local']['acc,none']:.3f}")
    assert worst_ll <= 1e-4 and worst_rel <= 1e-6
    acc = ours["results"]["lambada_local"]["acc,none"]
    assert 0 < acc < 1  # the comparison has teeth: some last words are the argmax, some not
    generated = [s["resps"][0][0] for s in ours["samples"]["gen_local"]]
    assert any(generated) and len(set(generated)) > 1


def test_a_task_lm_eval_cannot_build_is_one_line(setup, tmp_path, capsys):
    """A local task whose data file is empty: lm-eval's dataset loading raises (StopIteration in
    `datasets`), which is one line naming the task, not a traceback; nothing is written."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tasks / "empty_local.yaml").write_text(TASKS["piqa_local"].format(d=tmp_path).replace("piqa_local", "empty_local")
                                            .replace("piqa.jsonl", "empty.jsonl"))
    out = tmp_path / "r.json"
    assert main(["-q", "eval", str(setup["ck"]), "--tasks", "empty_local", "--include-path", str(tasks),
                 "--tokenizer", str(setup["tokenizer_path"]), "--output", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
    assert len(err) == 1 and err[0].startswith("neox-jax: error: --tasks empty_local: lm-eval stopped ("), err
    assert not out.exists()


def test_builtin_lambada_and_eval_cli(setup, both, tmp_path, capfd, monkeypatch):
    """`eval` with LAMBADA, perplexity and an lm-eval task against HF; run outside a git repository,
    where lm-eval's git lookup used to print "fatal: not a git repository" (git's own stderr)."""
    hf, _ = both
    monkeypatch.chdir(tmp_path)
    assert subprocess.run(["git", "rev-parse"], capture_output=True).returncode != 0  # not in a repository
    out = tmp_path / "results.json"
    args = ["-q", "eval", str(setup["ck"]), "--lambada", str(setup["root"] / "lambada.jsonl"), "--perplexity",
            str(setup["root"] / "docs.jsonl"), "--tasks", "piqa_local", "--include-path", str(setup["tasks"]),
            "--tokenizer", str(setup["tokenizer_path"]), "--batch-size", "4", "--output", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    ref = hf["results"]["lambada_local"]
    assert res["results"]["lambada"]["accuracy"] == ref["acc,none"]
    assert res["results"]["lambada"]["perplexity"] == pytest.approx(ref["perplexity,none"], rel=1e-5)
    assert res["results"]["lm_eval"]["results"]["piqa_local"]["acc,none"] == hf["results"]["piqa_local"]["acc,none"]
    assert res["config"]["model"]["vocab_size"] == 50304 and res["config"]["args"]["batch_size"] == 4
    assert "fatal:" not in capfd.readouterr().err
    # document perplexity: HF rolling windows of CONTEXT tokens, first token of each document unscored
    tok, model = setup["tok"], setup["model"]
    total, count = 0.0, 0
    for line in (setup["root"] / "docs.jsonl").read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"])
        for first in range(1, len(ids), CONTEXT):
            last = min(first + CONTEXT, len(ids)) - 1
            start = max(0, last - CONTEXT)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids[start:last]])).logits.double(), -1)[0].numpy()
            total += sum(lp[i - 1 - start, ids[i]] for i in range(first, last + 1))
            count += last + 1 - first
    assert res["results"]["perplexity"]["tokens_scored"] == count
    assert res["results"]["perplexity"]["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    capfd.readouterr()
    assert main(args) == 2  # existing output untouched without --overwrite
    assert "exists" in capfd.readouterr().err and json.loads(out.read_text()) == res


def test_indexed_split_perplexity(tmp_path, record_property):
    """Perplexity of the `valid` part of a 969,30,1-style split, against HF logits on the samples
    cut by hand from the concatenated documents."""
    from neox_jax.data.indexed import IndexedDatasetWriter
    from neox_jax.data.order import train_valid_test_split

    model = hf_model(seed=22, vocab=211, hidden=64, heads=4, layers=2, max_pos=64)
    cfg, params = ours_from_hf(model, compute_dtype="float32")
    C.save_params(tmp_path / "ck", cfg, params)
    rs = np.random.RandomState(5)
    docs = [rs.randint(0, 211, rs.randint(5, 60)) for _ in range(40)]
    with IndexedDatasetWriter(tmp_path / "data_text_document", np.uint16) as w:
        for d in docs:
            w.add_document(d)
        w.finalize()
    S = 32
    out = tmp_path / "ppl.json"
    assert main(["-q", "eval", str(tmp_path / "ck"), "--data-prefix", str(tmp_path / "data_text_document"),
                 "--split", "6,3,1", "--seq-length", str(S), "--batch-size", "3", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["indexed_perplexity"]
    a, b = train_valid_test_split("6,3,1", len(docs))[1:3]
    stream = np.concatenate(docs[a:b])
    n = (len(stream) - 1) // S
    nll = []
    for j in range(n):
        sample = stream[j * S : j * S + S + 1]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(sample[None, :-1].astype(np.int64))).logits.double(), -1)[0]
        nll.extend(-lp[np.arange(S), torch.tensor(sample[1:].astype(np.int64))].numpy())
    assert res["documents"] == [a, b] and res["samples"] == n and res["tokens_scored"] == n * S
    assert res["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    record_property("measured", f"indexed valid split: {n} samples, perplexity {res['perplexity']:.3f} "
                                f"(HF {math.exp(np.mean(nll)):.3f})")


def test_eval_errors(setup, tmp_path, capsys):
    ck = str(setup["ck"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"txt": "x"}\n')
    cases = [
        ([], "nothing to evaluate"),
        (["--lambada", str(bad)], "bad.jsonl:2: expected an object with a non-empty string 'text'"),
        (["--lambada", str(tmp_path / "none.jsonl")], "none.jsonl: input file not found"),
        (["--tasks", "no_such_task_xyz"], "unknown lm-eval task(s) ['no_such_task_xyz']"),
        (["--split", "1,1,1"], "--split has no effect without --data-prefix"),
        (["--lambada", str(bad), "--split-part", "test"], "--split-part has no effect without --split"),
        (["--lambada", str(bad), "--limit", "3"], "--limit has no effect without --tasks"),
        (["--data-prefix", str(tmp_path / "missing")], "missing"),
    ]
    for extra, msg in cases:
        assert main(["eval", ck, "--output", str(tmp_path / "r.json"), *extra]) == 2, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("neox-jax: error:")]
        assert len(err) == 1 and msg in err[0], (extra, err)
    assert not (tmp_path / "r.json").exists()
    from neox_jax.errors import UserError
    from neox_jax.eval.harness import NeoxJaxLM

    with pytest.raises(UserError, match="unknown model_args \\['pretrained'\\]"):
        NeoxJaxLM(checkpoint=ck, pretrained="x")
