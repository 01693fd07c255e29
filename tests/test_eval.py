"""`rsa eval` on tiny Llama models built from configs: two models in one call, a function scorer
and a model scorer, KL to a reference, metrics recomputed from samples.jsonl, batch
independence of the samples, and resuming (in process after a cut anywhere, and after a
SIGKILL of a real `rsa eval` process)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rsa.eval import EvalSettings, run_eval
from rsa.eval.kl import sequence_kl
from rsa.eval.sampling import generate, per_row_draw, row_seed
from test_eval_metrics import cvar_by_quantile_integral
from test_trainer_common import build_tokenizer, save_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCORERS = """
def reward(prompts, responses):
    return [float(len(r.split())) for r in responses]

def wrong_count(prompts, responses):
    return [0.0] * (len(responses) - 1)

def nan_cost(prompts, responses):
    return [float("nan")] + [0.0] * (len(responses) - 1)
"""
PROMPTS = [{"prompt": "how do i make a red mat"}, {"prompt": "tell me"},
           {"prompt": [{"role": "user", "content": "can you help me"}], "other": 1},
           {"prompt": "is the big dog safe", "response_0": "PKU-SafeRLHF fields are ignored"}]


def save_classifier(folder, num_labels=2, seed=5) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      num_labels=num_labels, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and much faster on a loaded machine (no OpenMP waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    for name, seed in (("a", 0), ("b", 1), ("ref", 2)):
        save_tiny_model(tmp / name, seed)
    save_classifier(tmp / "cost")
    write_jsonl(PROMPTS, tmp / "prompts.jsonl")
    (tmp / "tiny_scorers.py").write_text(SCORERS)
    sys.path.insert(0, str(tmp))
    yield tmp
    sys.path.remove(str(tmp))


def settings(work, **kw) -> EvalSettings:
    base = dict(models={"a": str(work / "a"), "B": str(work / "b")}, prompts=str(work / "prompts.jsonl"),
                cost=f"{work / 'cost'}#1", reward="tiny_scorers:reward", reference=str(work / "ref"), samples=3,
                max_new_tokens=10, batch_size=4, seed=0, threshold=0.05)
    base.update(kw)
    return EvalSettings(**base)


@pytest.fixture(scope="module")
def full_run(work):
    out = work / "full"
    report = run_eval(settings(work), out, progress=False)
    lines = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    return out, report, lines


def test_two_models_every_line_in_plan_order(full_run):
    out, report, lines = full_run
    want = [(m, p, s) for m in ("a", "B") for p in range(4) for s in range(3)]
    assert [(r["model"], r["prompt_index"], r["sample_index"]) for r in lines] == want
    assert all(set(r) == {"model", "prompt_index", "sample_index", "prompt", "response", "reward", "cost", "kl"}
               for r in lines)
    assert lines[6]["prompt"] == "user : can you help me </s> assistant : "   # chat prompt, rendered
    assert len({r["response"] for r in lines}) > 12            # sampled, not one response repeated
    assert set(report["models"]) == {"a", "B"} and report["settings"]["prompts_count"] == 4
    assert report["definitions"]["kl_to_reference"].startswith("KL(S || R)")   # what the KL is, named
    for f in ("report.json", "tail.png", "frontier.png", "settings.json"):
        assert (out / f).is_file()


def test_function_scorer_and_model_scorer_values(full_run, work):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    _, _, lines = full_run
    clf = AutoModelForSequenceClassification.from_pretrained(str(work / "cost")).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "cost"))
    for r in lines:
        assert r["reward"] == len(r["response"].split())
        with torch.no_grad():   # one text at a time, no padding: logit 1
            want = clf(**tok(r["prompt"] + r["response"], return_tensors="pt")).logits[0, 1].item()
        assert r["cost"] == pytest.approx(want, abs=1e-5)


def test_report_metrics_recomputed_from_the_samples(full_run):
    _, report, lines = full_run
    for name, entry in report["models"].items():
        rows = [r for r in lines if r["model"] == name]
        cost = np.array([r["cost"] for r in rows])
        assert entry["n"] == 12
        assert entry["cost_mean"] == pytest.approx(cost.sum() / 12)
        assert entry["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / 12)
        assert entry["kl_to_reference"] == pytest.approx(sum(r["kl"] for r in rows) / 12)
        assert entry["catastrophic_rate"] == pytest.approx(sum(c >= 0.05 for c in cost) / 12)
        for a in (90, 95, 99):
            assert entry[f"cost_cvar{a}"] == pytest.approx(cvar_by_quantile_integral(cost, a / 100))
        assert set(entry["ci95"]) == set(entry) - {"n", "ci95"}
        assert all(lo <= hi for lo, hi in entry["ci95"].values())


def test_report_leaves_out_what_was_not_given(work):
    out = work / "bare"
    report = run_eval(settings(work, models={"a": str(work / "a")}, reward=None, reference=None, threshold=None,
                               cost="tiny_scorers:reward"), out, progress=False)
    assert set(report["models"]["a"]) == {"n", "cost_mean", "cost_cvar90", "cost_cvar95", "cost_cvar99", "ci95"}
    assert not (out / "frontier.png").exists() and (out / "tail.png").is_file() and "definitions" not in report
    assert "kl" not in (out / "samples.jsonl").read_text().splitlines()[0]


def test_a_response_does_not_depend_on_its_batch(full_run, work):
    """Alone in a batch (no padding) or among other prompts (left padding): same responses."""
    out = work / "alone"
    run_eval(settings(work, models={"a": str(work / "a")}, batch_size=1, reference=None), out, progress=False)
    alone = [json.loads(ln)["response"] for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert alone == [r["response"] for r in full_run[2] if r["model"] == "a"]


def test_kl_with_left_padding_matches_each_row_alone(work):
    from transformers import AutoModelForCausalLM
    policy, ref = (AutoModelForCausalLM.from_pretrained(str(work / n)).eval() for n in ("a", "ref"))
    prompts = [[2, 5, 6, 7], [2, 9], [2, 4, 5, 6, 7, 8, 10]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seq, gen = generate(policy, ids, per_row_draw([row_seed(0, i, 0) for i in range(3)]), max_new_tokens=12,
                        eos_ids=[3], pad_id=0, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones_like(seq[:, width:])], 1)
    got = sequence_kl(policy, ref, seq, width, gen, full_mask)
    for i, p in enumerate(prompts):
        response = seq[i, width:][gen[i]]
        row = torch.tensor([p + response.tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(policy(row).logits[0].double(), -1)
            logq = torch.log_softmax(ref(row).logits[0].double(), -1)
        want = sum(float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in range(len(p) - 1, row.shape[1] - 1))
        assert got[i].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert torch.all(gen[:, 0])   # the first token is always generated


def test_resume_after_a_cut_anywhere_ends_with_the_same_file(full_run, work):
    full = (full_run[0] / "samples.jsonl").read_bytes()
    lines = full.split(b"\n")
    for cut in (len(b"\n".join(lines[:5])) + 7,       # inside a line of the second batch
                len(b"\n".join(lines[:14])) + 1):     # a line boundary inside a batch of the second model
        out = work / f"cut{cut}"
        out.mkdir()
        shutil.copy(full_run[0] / "settings.json", out / "settings.json")
        (out / "samples.jsonl").write_bytes(full[:cut])
        run_eval(settings(work), out, progress=False)
        assert (out / "samples.jsonl").read_bytes() == full


def test_other_settings_in_the_same_folder_are_refused(full_run, work):
    from rsa.errors import UserError
    with pytest.raises(UserError, match="samples differ"):
        run_eval(settings(work, samples=4), full_run[0], progress=False)
    # The threshold only changes the report: a finished run is re-reported without sampling.
    before = (full_run[0] / "samples.jsonl").read_bytes()
    report = run_eval(settings(work, threshold=1e9), full_run[0], progress=False)
    assert report["models"]["a"]["catastrophic_rate"] == 0 and (full_run[0] / "samples.jsonl").read_bytes() == before


def test_sigkill_during_generation_then_rerun_gives_the_uninterrupted_file(work):
    """A real `rsa eval` process killed with SIGKILL once a batch is written (long responses
    make generation most of each batch's time), then run again."""
    kw = dict(models={"a": str(work / "a")}, reference=None, samples=3, max_new_tokens=16, batch_size=2)
    straight = work / "straight"
    run_eval(settings(work, **kw), straight, progress=False)
    killed = work / "killed"
    args = [sys.executable, "-m", "rsa.cli", "eval", "--model", f"a={work / 'a'}", "--prompts",
            str(work / "prompts.jsonl"), "--cost", f"{work / 'cost'}#1", "--reward", "tiny_scorers:reward",
            "--samples", "3", "--max-new-tokens", "16", "--batch-size", "2", "--seed", "0", "--threshold", "0.05",
            "--device", "cpu", "--out", str(killed), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = killed / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    total = (straight / "samples.jsonl").read_bytes()
    assert 2 <= path.read_bytes().count(b"\n") < total.count(b"\n")   # stopped part way
    run_eval(settings(work, **kw), killed, progress=False)
    assert path.read_bytes() == total


def test_model_scorer_adds_no_second_bos(work):
    """A prompt rendered by a chat template that starts with the BOS string keeps one BOS; a
    plain-text prompt gets the tokenizer's; the batch is scored as each text alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from rsa.eval.scorers import ModelScorer
    scorer = ModelScorer(f"{work / 'cost'}#1", "cost")
    clf = AutoModelForSequenceClassification.from_pretrained(str(work / "cost")).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "cost"))
    prompts = ["<s> user : can you help me </s> assistant : ", "how do i make a red mat"]
    responses = ["sure the cat sat", "no"]
    got = scorer(prompts, responses)
    for text, value in zip((p + r for p, r in zip(prompts, responses)), got):
        ids = [tok.bos_token_id] + tok(text.removeprefix("<s>"), add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1
        with torch.no_grad():
            want = clf(input_ids=torch.tensor([ids])).logits[0, 1].item()
        assert value == pytest.approx(want, abs=1e-5)


def test_dtype_loads_every_model_in_it(work):
    from rsa.eval.loading import load_causal_lm
    assert EvalSettings(models={"a": str(work / "a")}, prompts=str(work / "prompts.jsonl"), cost="x:y").dtype == "float32"
    assert next(load_causal_lm(work / "a", "--model a", "cpu", "bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(work / "a", "--model a", "cpu").parameters()).dtype == torch.float32   # auto: as stored
    out = work / "bf16"
    report = run_eval(settings(work, models={"a": str(work / "a")}, samples=1, max_new_tokens=4, dtype="bfloat16"), out,
                      progress=False)
    assert json.loads((out / "settings.json").read_text())["dtype"] == "bfloat16"
    assert report["settings"]["dtype"] == "bfloat16" and np.isfinite(report["models"]["a"]["kl_to_reference"])


def test_rsa_eval_imports_run_one_way():
    """No module of rsa.eval imports, even inside a function, one that imports it back."""
    import ast
    folder = ROOT / "rsa" / "eval"
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rsa.eval."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps & names - {"__init__"}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph[start])
    assert [m for m in graph if reaches(m, m)] == []
