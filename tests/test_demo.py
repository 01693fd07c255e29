"""The embedded demo: task, tokenizer, sampling and scoring pieces, then `rsa demo --quick` end to end."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from rsa.demo import data, evaluate, frontier, protocol, report, runs, sft, task  # noqa: E402


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


# ---------------------------------------------------------------------------- frontier interpolation


def test_compare_hand_computed_overlap():
    # a: 0 -> 0, 2 -> 2; b: 3 everywhere on [1, 3]; common x: [1, 2], a - b goes -2 -> -1
    r = frontier.compare(([0, 2], [0, 2]), ([1, 3], [3, 3]))
    assert r["range"] == [1, 2] and r["mean_diff"] == pytest.approx(-1.5)
    assert (r["min_diff"], r["max_diff"]) == (-2, -1) and r["dominance"] == frontier.A_LOWER
    assert frontier.compare(([1, 3], [3, 3]), ([0, 2], [0, 2]))["dominance"] == frontier.B_LOWER


def test_compare_frontiers_that_do_not_overlap_or_only_touch():
    assert frontier.compare(([0, 1], [5, 6]), ([1.5, 3], [0, 0])) is None
    assert frontier.compare(([2], [1]), ([0, 1], [0, 0])) is None          # a single point outside
    touch = frontier.compare(([0, 1], [0, 4]), ([1, 2], [1, 9]))           # they share x = 1 only
    assert touch["range"] == [1, 1] and touch["mean_diff"] == 3 and touch["dominance"] == frontier.B_LOWER


def test_compare_single_point_against_a_curve():
    r = frontier.compare(([1.5], [4]), ([1, 2], [0, 2]))                    # b(1.5) = 1
    assert r["range"] == [1.5, 1.5] and r["mean_diff"] == pytest.approx(3) and r["dominance"] == frontier.B_LOWER
    same = frontier.compare(([1.5], [1]), ([1.5], [1]))
    assert same["mean_diff"] == 0 and same["dominance"] == frontier.EQUAL


def test_compare_non_monotone_and_unordered_frontier():
    # a's points out of order, a peak in the middle: (0, 0), (1, 4), (2, 0); b = 1 on [0, 2]
    r = frontier.compare(([2, 0, 1], [0, 0, 4]), ([0, 2], [1, 1]))
    # a - b: -1, 3, -1 at x = 0, 1, 2; mean = (1 + 1) / 2 = 1
    assert r["range"] == [0, 2] and r["mean_diff"] == pytest.approx(1.0)
    assert (r["min_diff"], r["max_diff"]) == (-1, 3) and r["dominance"] == frontier.CROSSING


def test_compare_ties_in_x_are_averaged_and_equal_curves_tie():
    xs, ys = frontier.curve([1, 1, 2], [0, 2, 5])
    assert xs.tolist() == [1, 2] and ys.tolist() == [1, 5]
    r = frontier.compare(([1, 1, 2], [0, 2, 5]), ([2, 1], [5, 1]))
    assert r["mean_diff"] == 0 and r["dominance"] == frontier.EQUAL
    # touching at one node, lower elsewhere: nowhere above, so a is lower
    assert frontier.compare(([0, 1, 2], [0, 1, 0]), ([0, 2], [1, 1]))["dominance"] == frontier.A_LOWER


def test_compare_mean_matches_a_dense_numerical_average():
    rng = np.random.default_rng(0)
    for _ in range(20):
        na, nb = rng.integers(1, 6), rng.integers(2, 6)
        a = (rng.uniform(0, 3, na), rng.normal(size=na))
        b = (rng.uniform(0, 3, nb), rng.normal(size=nb))
        r = frontier.compare(a, b)
        lo, hi = max(a[0].min(), b[0].min()), min(a[0].max(), b[0].max())
        if lo > hi:
            assert r is None
            continue
        grid = np.linspace(lo, hi, 200_001)
        ia, ib = np.argsort(a[0]), np.argsort(b[0])
        d = np.interp(grid, a[0][ia], a[1][ia]) - np.interp(grid, b[0][ib], b[1][ib])
        assert r["mean_diff"] == pytest.approx(d.mean(), abs=1e-3)
        assert r["min_diff"] == pytest.approx(d.min(), abs=1e-3) and r["max_diff"] == pytest.approx(d.max(), abs=1e-3)


def test_curve_rejects_bad_frontiers():
    with pytest.raises(ValueError, match="xs"):
        frontier.curve([], [])
    with pytest.raises(ValueError, match="ys"):
        frontier.curve([1, 2], [1])
    with pytest.raises(ValueError, match="ys"):
        frontier.curve([1, 2], [1, float("nan")])


def test_over_seeds_counts_and_spread():
    lower, higher = {"mean_diff": -1.0, "dominance": frontier.A_LOWER}, {"mean_diff": 2.0, "dominance": frontier.CROSSING}
    s = frontier.over_seeds([lower, None, higher])
    assert (s["seeds"], s["overlapping_seeds"], s["rsa_lower_seeds"], s["sacpo_lower_seeds"]) == (3, 2, 1, 1)
    assert s["diff_mean"] == pytest.approx(0.5) and s["diff_std"] == pytest.approx(1.5)
    assert s["rsa_lower_everywhere_seeds"] == 1 and s["crossing_seeds"] == 1 and s["outcome"] == "neither"
    assert s["per_seed"][1] is None and s["per_seed"][0]["dominance"] == "rsa lower"
    assert frontier.over_seeds([lower, lower])["outcome"] == "rsa lower"
    assert frontier.over_seeds([higher, None])["outcome"] == "sacpo lower"
    none = frontier.over_seeds([None, None])
    assert none["outcome"] == "no overlap" and none["diff_mean"] is None and none["rsa_lower_seeds"] == 0


def _rows(seeds=2):
    """Hand-made frontiers: rsa's cost CVaR95 is 1 below sacpo's at every reward in seed 0 and
    1 above in seed 1; the P frontiers never share a reward."""
    rows = []
    for seed in range(seeds):
        shift = -1.0 if seed == 0 else 1.0
        for method, family, setting, reward, kl in (
                ("sacpo", "H->S", 0.5, 3.0, 4.0), ("sacpo", "H->S", 0.05, 1.0, 8.0),
                ("rsa", "H->S", 0.5, 2.5, 1.0), ("rsa", "H->S", 0.05, 0.5, 2.0),
                ("sacpo", "P", 0.25, 3.0, 5.0), ("sacpo", "P", 0.75, 2.0, 6.0),
                ("rsa", "P", 0.25, 1.5, 5.5), ("rsa", "P", 0.75, 0.5, 7.0)):
            cvar = 10 - 2 * reward + (shift if method == "rsa" else 0.0)
            rows.append({"seed": seed, "key": protocol.model_key(method, family, setting), "label": method,
                         "method": method, "family": family, "setting": setting, "reward_mean": reward,
                         "cost_mean": 1.0, "cost_cvar95": cvar, "catastrophic_rate": 0.01, "kl_to_sft": kl})
    return rows


def test_matched_on_hand_made_frontiers():
    m = frontier.matched(_rows(), seeds=2)
    hs = m["reward"]["H->S"]["cost_cvar95"]
    assert [r["range"] for r in hs["per_seed"]] == [[1.0, 2.5], [1.0, 2.5]]
    assert [r["mean_diff"] for r in hs["per_seed"]] == pytest.approx([-1.0, 1.0])
    assert hs["rsa_lower_seeds"] == 1 and hs["outcome"] == "neither" and hs["diff_std"] == pytest.approx(1.0)
    assert m["reward"]["H->S"]["catastrophic_rate"]["outcome"] == "neither"           # equal: a tie
    assert m["reward"]["P"]["cost_cvar95"]["outcome"] == "no overlap"
    assert m["kl"]["H->S"]["cost_cvar95"]["outcome"] == "no overlap"                  # KL 1-2 vs 4-8
    assert m["kl"]["P"]["cost_cvar95"]["overlapping_seeds"] == 2
    text = report.verdict(m)
    assert "Verdict: neither" in text and "no common" in text


def test_verdict_follows_the_outcomes():
    def matched(outcome_hs, outcome_p):
        def entry(o):
            n = 0 if o == "no overlap" else 3
            return {"outcome": o, "seeds": 3, "overlapping_seeds": n, "diff_mean": None if n == 0 else -1.0,
                    "diff_std": None if n == 0 else 0.5, "rsa_lower_seeds": n if o == "rsa lower" else 0,
                    "sacpo_lower_seeds": n if o == "sacpo lower" else 0, "rsa_lower_everywhere_seeds": 0,
                    "sacpo_lower_everywhere_seeds": 0}
        fam = lambda o: {"cost_cvar95": entry(o), "catastrophic_rate": entry(o)}
        return {"reward": {"H->S": fam(outcome_hs), "P": fam(outcome_p)}, "kl": {"H->S": fam(outcome_hs), "P": fam(outcome_p)}}
    last = lambda m: report.verdict(m).splitlines()[-1]
    assert last(matched("rsa lower", "rsa lower")).startswith("Verdict: at matched helpfulness RSA has a lower")
    assert "H->S: 3 of 3 overlapping seeds" in last(matched("rsa lower", "rsa lower"))
    assert "reach no common reward" in last(matched("rsa lower", "no overlap"))
    assert last(matched("sacpo lower", "sacpo lower")).startswith("Verdict: at matched helpfulness SACPO, not RSA")
    assert last(matched("rsa lower", "sacpo lower")).startswith("Verdict: neither")
    assert "cannot compare" in last(matched("no overlap", "no overlap"))


def test_report_tables_and_plots(tmp_path):
    rows = _rows()
    fronts = frontier.frontiers(rows)
    assert [e["merge_weight"] for e in fronts["P"]] == [0.25, 0.75, 0.25, 0.75]
    first = fronts["H->S"][0]
    assert first["method"] == "sacpo" and first["beta_over_lambda"] == 0.5 and first["std"]["cost_cvar95"] == 0
    assert first["reward_mean"] == 3.0 and len(first["seeds"]) == 2
    # the best reward-matched pair: H->S has two at distance 0.5, the first in knob order wins
    picks = report.tail_picks(fronts)
    assert [p["reward_mean"] for p in picks["H->S"]] == [3.0, 2.5] and [p["reward_mean"] for p in picks["P"]] == [2.0, 1.5]
    assert "rsa" in report.frontier_table(rows)
    assert "no overlap" in report.matched_table(frontier.matched(rows, 2))
    anchor = report.aggregate({"sft": [{"seed": 0, **{k: 1.0 for k in report.METRICS}}]})
    report.plot_frontier(tmp_path, fronts, anchor)
    report.plot_tail(tmp_path, {"sft": np.array([0.0, 1.0, 100.0]), "rsa (P) w=0.25": np.array([0.0, 0.0, 40.0])})
    report.plot_training(tmp_path, {"rsa (rsa2)": {"helpful": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]}})
    for name in ("frontier.png", "tail.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_settings_change_starts_over(tmp_path):
    s = protocol.Settings.quick()
    (tmp_path / "seed0").mkdir()
    assert "no settings.json" in runs.check_settings(tmp_path, s, fresh=False)   # of unknown make
    assert not (tmp_path / "seed0").exists()
    (tmp_path / "seed0").mkdir()
    assert runs.check_settings(tmp_path, s, fresh=False) is None and (tmp_path / "seed0").is_dir()
    assert runs.check_settings(tmp_path, protocol.Settings.quick(seeds=2), fresh=False) is None   # more seeds reuse
    assert (tmp_path / "seed0").is_dir()
    note = runs.check_settings(tmp_path, protocol.Settings.quick(max_steps=7), fresh=False)
    assert "settings differ" in note and not (tmp_path / "seed0").exists()
    (tmp_path / "seed0").mkdir()
    assert "--fresh" in runs.check_settings(tmp_path, protocol.Settings.quick(max_steps=7), fresh=True)
    with pytest.raises(ValueError, match="safety_grid"):
        protocol.Settings(safety_grid=(0.5, 0.5))
    with pytest.raises(ValueError, match="merge_weights"):
        protocol.Settings(merge_weights=(0.0, 0.5))


def test_protocol_configs_start_every_safety_step_from_the_helpfulness_model():
    from rsa.config import load_config
    from rsa.stepwise import stage_args

    s = protocol.Settings()
    cfg = load_config(protocol.run_config(s, 0, "rsa2", "rsa"))
    assert [st["name"] for st in cfg["stages"]] == ["helpful", "safe-0.5", "safe-0.25", "safe-0.125", "safe-0.05"]
    assert all(st["reference"] == "helpful" for st in cfg["stages"][1:])
    betas = [stage_args(st, cfg, Path("x"), False).beta for st in cfg["stages"]]
    assert betas == [0.5, 0.5, 0.25, 0.125, 0.05]
    assert max(s.safety_grid) / min(s.safety_grid) >= 10 and len(s.safety_grid) >= 4


# ---------------------------------------------------------------------------- end to end


def _finished(out: Path) -> dict:
    """Every file marking finished work, with its modification time."""
    marks = [*out.glob("seed0/sft/demo_sft.json"), *out.glob("seed0/data/stats.json"),
             *out.glob("seed0/*/*/stage.json"), *out.glob("seed0/merge/*/merge.json"), *out.glob("seed0/eval/*.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in marks}


def test_rsa_demo_quick_killed_then_resumed(tmp_path):
    pytest.importorskip("rsa.stepwise")
    from rsa.cli import main

    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rsa.cli", "demo", "--quick", "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it once the first stage has finished (the next one is then under way)
        deadline = time.time() + 300
        while not (out / "seed0" / "sacpo" / "helpful" / "stage.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "the demo ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    before = _finished(out)
    assert "seed0/sacpo/helpful/stage.json" in before and not (out / "report.json").exists()

    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    after = _finished(out)
    assert {k: after[k] for k in before} == before                      # nothing finished was redone
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) >= {"methods", "verdict", "settings", "data", "elapsed_s", "frontier", "matched"}
    assert set(rep["methods"]) == {"sft", "dpo", "ra-dpo", "sacpo", "rsa"}
    for name, entry in rep["methods"].items():
        for key in report.METRICS:
            assert np.isfinite(entry[key]), (name, key)
        assert len(entry["seeds"]) == 1
    assert rep["methods"]["sft"]["kl_to_sft"] == 0
    assert all(rep["methods"][m]["kl_to_sft"] > 0 for m in ("dpo", "ra-dpo", "sacpo", "rsa"))   # training moved them
    assert set(rep["frontier"]) == {"H->S", "P"}
    for family, knob, values in (("H->S", "beta_over_lambda", [0.5, 0.05]), ("P", "merge_weight", [0.25, 0.75])):
        entries = rep["frontier"][family]
        assert [(e["method"], e[knob]) for e in entries] == [(m, v) for m in ("sacpo", "rsa") for v in values]
        for e in entries:
            assert set(e["std"]) == set(frontier.POINT_METRICS)
            assert all(np.isfinite(e[k]) for k in frontier.POINT_METRICS)
    assert set(rep["matched"]) == {"reward", "kl"}
    for axis in rep["matched"].values():
        for family in ("H->S", "P"):
            for metric in ("cost_cvar95", "catastrophic_rate"):
                e = axis[family][metric]
                assert e["seeds"] == 1 and len(e["per_seed"]) == 1
                assert e["outcome"] in ("rsa lower", "sacpo lower", "neither", "no overlap")
    assert rep["verdict"].splitlines()[-1].startswith("Verdict:")
    for name in ("frontier.png", "tail.png", "training.png"):
        assert (out / name).stat().st_size > 0

    # once finished, a third call redoes nothing and reports the same numbers
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert _finished(out) == after
    again = json.loads((out / "report.json").read_text())
    assert again["frontier"] == rep["frontier"] and again["matched"] == rep["matched"]
