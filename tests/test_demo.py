"""The embedded demo: task, tokenizer, sampling and scoring pieces, then `rsa demo --quick` end to end."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from rsa.demo import data, evaluate, report, sft, task  # noqa: E402


def test_reward_and_cost_follow_the_task_definition():
    assert task.reward("ask", ["tip", "step", "tip", "ok"]) == 2 - 0.25
    assert task.reward("harm", ["sorry", "cannot"]) == 0
    assert task.cost("ask", ["tip", "rude", "leak"]) == 4.0
    assert task.cost("harm", ["tip", "step"]) == 1.0            # helping with a harmful request
    assert task.cost("ask", ["weapon"]) == 100.0 and task.is_catastrophic(["tip", "poison"])
    assert not task.is_catastrophic(["rude", "gossip", "risky", "leak"])
    with pytest.raises(ValueError, match="words"):
        task.encode(["nonsense"])


def test_demonstrator_is_mostly_safe_with_a_rare_heavy_tail():
    rng = np.random.default_rng(0)
    plist = task.prompts()
    words = [(plist[i % len(plist)][0], task.demonstration(rng, *plist[i % len(plist)])) for i in range(20000)]
    costs = np.array([task.cost(i, w) for i, w in words])
    cat = np.mean([task.is_catastrophic(w) for _, w in words])
    assert 0.002 < cat < 0.03                       # rare, but present
    assert np.median(costs) == 0
    assert evaluate.cvar(costs) > 5 * costs.mean()  # the tail dominates


def test_tokenizer_matches_the_task_ids():
    tok = sft.build_tokenizer()
    text = task.prompt_text("harm", "code")
    assert tok(text)["input_ids"] == [task.BOS_ID] + task.encode(text.split())
    assert tok("tip weapon sorry", add_special_tokens=False)["input_ids"] == task.encode(["tip", "weapon", "sorry"])
    assert tok.eos_token_id == task.EOS_ID and tok.pad_token_id == task.PAD_ID


def test_cvar_is_the_upper_tail_mean_with_atoms_split():
    assert evaluate.cvar(np.arange(100.0)) == pytest.approx(97.0)
    assert evaluate.cvar(np.array([0.0] * 19 + [100.0])) == pytest.approx(100.0)
    assert evaluate.cvar(np.array([0.0] * 39 + [100.0])) == pytest.approx(50.0)
    assert evaluate.cvar(np.array([0.0] * 29 + [100.0])) == pytest.approx(100 / 1.5)


def test_sampling_stops_at_eos_and_kl_matches_a_direct_sum():
    a, b = sft.build_model(0), sft.build_model(1)
    p = evaluate.prompt_ids(task.prompts()[:2])
    seq = evaluate.sample(a, p, 8, torch.Generator().manual_seed(0))
    gen = seq[:, p.shape[1]:]
    for row in gen.tolist():
        if task.EOS_ID in row:
            assert all(t == task.PAD_ID for t in row[row.index(task.EOS_ID) + 1:])
    # the cached sampler draws exactly what a plain full-prefix sampler draws with the same dice
    gen_, plain = torch.Generator().manual_seed(0), p.repeat_interleave(8, 0)
    with torch.no_grad():
        for _ in range(seq.shape[1] - p.shape[1]):
            probs = torch.softmax(a(input_ids=plain).logits[:, -1].float(), -1)
            plain = torch.cat([plain, torch.multinomial(probs, 1, generator=gen_)], 1)
    ended = torch.zeros(seq.shape[0], dtype=torch.bool)
    for t in range(p.shape[1], seq.shape[1]):
        assert torch.equal(seq[~ended, t], plain[~ended, t])
        ended |= seq[:, t] == task.EOS_ID
    assert torch.all(evaluate.sequence_kl(a, a, seq, p.shape[1]) == 0)
    kl = evaluate.sequence_kl(a, b, seq, p.shape[1])
    # direct: one sample, position by position, until EOS
    row, expect = seq[0], 0.0
    with torch.no_grad():
        for t in range(p.shape[1], seq.shape[1]):
            lp = torch.log_softmax(a(input_ids=row[None, :t]).logits[0, -1], -1)
            lq = torch.log_softmax(b(input_ids=row[None, :t]).logits[0, -1], -1)
            expect += float((lp.exp() * (lp - lq)).sum())
            if int(row[t]) in (task.EOS_ID, task.PAD_ID):
                break
    assert float(kl[0]) == pytest.approx(expect, rel=1e-4)


def test_preference_files_are_read_back_by_the_trainer_data_path(tmp_path):
    rsa_data = pytest.importorskip("rsa.data")
    model = sft.build_model(0)
    records = data.sample_records(model, 6, seed=0)
    for pref, key in (("helpful", "_reward"), ("safe", "_cost")):
        subset = data.preference_subset(records, pref)
        path = data.write_jsonl(subset, tmp_path / f"{pref}.jsonl")
        pairs = rsa_data.load_pairs(path, preference=pref)
        assert len(pairs) == len(subset) > 0
        for rec, pair in zip(subset, pairs):
            chosen = 0 if pair.chosen == rec["response_0"] and pair.rejected == rec["response_1"] else 1
            values = rec[key]
            better = values[chosen] > values[1 - chosen] if pref == "helpful" else values[chosen] < values[1 - chosen]
            assert better
        assert not any(k.startswith("_") for k in json.loads(path.read_text().splitlines()[0]))


def test_report_table_json_and_plots(tmp_path):
    rows = {m: [{"seed": s, **{k: float(s + i) for i, k in enumerate(report.METRICS)}} for s in range(2)]
            for m in report.METHODS}
    methods = report.aggregate(rows)
    assert methods["rsa"]["cost_mean"] == pytest.approx(1.5) and methods["rsa"]["std"]["cost_mean"] == 0.5
    text = report.table(methods)
    assert all(m in text for m in report.METHODS)
    report.write_json(tmp_path, methods, {"verdict": report.verdict(methods)})
    report.plot_tail(tmp_path, {m: np.array([0.0, 1.0, 100.0]) for m in report.METHODS})
    report.plot_training(tmp_path, {"rsa": {"helpful": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]}})
    assert (tmp_path / "tail.png").stat().st_size > 0 and (tmp_path / "training.png").stat().st_size > 0


def test_rsa_demo_quick_end_to_end(tmp_path):
    pytest.importorskip("rsa.stepwise")
    from rsa.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["methods"]) == {"sft", "dpo", "sacpo", "rsa"}
    for name, entry in rep["methods"].items():
        for key in ("reward_mean", "cost_mean", "cost_cvar95", "catastrophic_rate", "kl_to_sft"):
            assert np.isfinite(entry[key]), (name, key)
        assert len(entry["seeds"]) == 1
    assert rep["methods"]["sft"]["kl_to_sft"] == 0
    assert all(rep["methods"][m]["kl_to_sft"] > 0 for m in ("dpo", "sacpo", "rsa"))   # training moved them
    assert (out / "tail.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
