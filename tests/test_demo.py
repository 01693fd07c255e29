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

from rsa.demo import data, evaluate, frontier, probe, protocol, report, runs, sft, stats, task  # noqa: E402


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
    assert float(kl[0]) == pytest.approx(_direct_kl(a, b, seq[0], p.shape[1]), rel=1e-4)


def _direct_kl(a, b, row: torch.Tensor, prompt_len: int) -> float:
    """KL(a || b) of one sample's next-token distributions, position by position, up to and
    including the step that emits the first EOS or PAD."""
    expect = 0.0
    with torch.no_grad():
        for t in range(prompt_len, row.shape[0]):
            lp = torch.log_softmax(a(input_ids=row[None, :t]).logits[0, -1], -1)
            lq = torch.log_softmax(b(input_ids=row[None, :t]).logits[0, -1], -1)
            expect += float((lp.exp() * (lp - lq)).sum())
            if int(row[t]) in (task.EOS_ID, task.PAD_ID):
                break
    return expect


def test_kl_and_scored_text_use_the_same_tokens_when_pad_is_sampled():
    """An untrained model samples PAD (and tokens after it) before EOS: the scored text stops at
    the first EOS or PAD, and the KL counts exactly those steps plus the one that ended it."""
    a, b = sft.build_model(0), sft.build_model(1)
    p = evaluate.prompt_ids(task.prompts()[:3])
    seq = evaluate.sample(a, p, 32, torch.Generator().manual_seed(1))
    gen = seq[:, p.shape[1]:]
    live = evaluate._live(gen)
    early_pad = []
    for i, row in enumerate(gen.tolist()):
        words = task.decode_response(row)
        ended = len(words) < len(row)          # an EOS or PAD ends the text before max length
        assert live[i].sum().item() == len(words) + ended
        assert live[i, :len(words) + ended].all()
        if ended and row[len(words)] == task.PAD_ID and any(t != task.PAD_ID for t in row[len(words) + 1:]):
            early_pad.append(i)
    assert early_pad, "no row sampled PAD before other tokens: the case is not exercised"
    kl = evaluate.sequence_kl(a, b, seq, p.shape[1])
    i = early_pad[0]
    assert float(kl[i]) == pytest.approx(_direct_kl(a, b, seq[i], p.shape[1]), rel=1e-4)


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


def test_t_quantile_and_interval_match_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, value in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (29, 2.045230), (1000, 1.962339)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)
    assert stats.t_quantile(0.025, 9) == pytest.approx(-2.262157, abs=1e-6)
    assert stats.t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)
    lo, hi = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])     # mean 3, sd 1.5811, n 5
    assert (lo + hi) / 2 == pytest.approx(3.0) and (hi - lo) / 2 == pytest.approx(2.776445 * 1.5811388 / 5 ** 0.5)
    assert stats.t_interval([4.0]) is None and stats.t_interval([]) is None
    assert stats.clipped([-1.0, 2.0], 0.0) == [0.0, 2.0] and stats.clipped([-1.0, 2.0], None) == [-1.0, 2.0]
    with pytest.raises(ValueError, match="p must"):
        stats.t_quantile(1.0, 3)


def test_t_interval_covers_95_percent_of_normal_means():
    rng = np.random.default_rng(0)
    hits = sum(lo <= 0 <= hi for lo, hi in (stats.t_interval(rng.normal(size=10)) for _ in range(4000)))
    assert 0.935 < hits / 4000 < 0.965


def _diff(d):
    return {"mean_diff": d, "dominance": frontier.A_LOWER if d < 0 else frontier.CROSSING}


def test_over_seeds_counts_spread_interval_and_outcome():
    lower, higher = _diff(-1.0), _diff(2.0)
    s = frontier.over_seeds([lower, None, higher])
    assert (s["seeds"], s["overlapping_seeds"], s["rsa_lower_seeds"], s["sacpo_lower_seeds"]) == (3, 2, 1, 1)
    assert s["diff_mean"] == pytest.approx(0.5) and s["diff_std"] == pytest.approx(1.5)
    # t interval over the 2 overlapping seeds: 0.5 ± 12.706205 * 2.1213 / sqrt(2)
    assert s["ci95"] == pytest.approx([0.5 - 12.706205 * 1.5, 0.5 + 12.706205 * 1.5], abs=1e-5)
    assert s["rsa_lower_everywhere_seeds"] == 1 and s["crossing_seeds"] == 1 and s["outcome"] == "inconclusive"
    assert s["per_seed"][1] is None and s["per_seed"][0]["dominance"] == "rsa lower"
    # the same sign in every seed is not enough: the interval must exclude 0
    assert frontier.over_seeds([_diff(-1.0), _diff(-3.0), _diff(-0.1)])["outcome"] == "inconclusive"
    tight = frontier.over_seeds([_diff(v) for v in (-1.0, -1.1, -0.9, -1.05)])
    assert tight["outcome"] == "rsa lower" and tight["ci95"][1] < 0
    assert frontier.over_seeds([_diff(v) for v in (2.0, 2.2, 1.9)])["outcome"] == "sacpo lower"
    one = frontier.over_seeds([lower, None])                      # one overlapping seed: no interval
    assert one["ci95"] is None and one["outcome"] == "inconclusive"
    none = frontier.over_seeds([None, None])
    assert none["outcome"] == "no overlap" and none["diff_mean"] is None and none["ci95"] is None
    assert none["rsa_lower_seeds"] == 0


def _rows(seeds=2):
    """Hand-made frontiers: rsa's cost CVaR95 is 1 below sacpo's at every reward in seed 0 and
    1 above in seed 1; the P frontiers never share a reward; rsa (DPO->S) is 2 below sacpo
    (H->S) at every reward, in every seed (apart from a wobble of 0.1 by seed)."""
    rows = []
    for seed in range(seeds):
        shift = -1.0 if seed == 0 else 1.0
        for method, family, setting, reward, kl in (
                ("sacpo", "H->S", 0.5, 3.0, 4.0), ("sacpo", "H->S", 0.05, 1.0, 8.0),
                ("rsa", "H->S", 0.5, 2.5, 1.0), ("rsa", "H->S", 0.05, 0.5, 2.0),
                ("sacpo", "P", 0.25, 3.0, 5.0), ("sacpo", "P", 0.75, 2.0, 6.0),
                ("rsa", "P", 0.25, 1.5, 5.5), ("rsa", "P", 0.75, 0.5, 7.0),
                ("rsa", "DPO->S", 0.5, 2.8, 3.0), ("rsa", "DPO->S", 0.05, 1.3, 5.0)):
            cvar = 10 - 2 * reward + (shift if method == "rsa" else 0.0)
            if family == "DPO->S":
                cvar = 10 - 2 * reward - 2.0 + 0.1 * seed
            rows.append({"seed": seed, "key": protocol.model_key(method, family, setting), "label": method,
                         "method": method, "family": family, "setting": setting, "reward_mean": reward,
                         "cost_mean": 1.0, "cost_cvar95": cvar, "catastrophic_rate": 0.01, "kl_to_sft": kl,
                         "probe": {"catastrophic": {"mean_logp": -5.0 - (1.0 if method == "sacpo" else 0.0) - 0.1 * seed,
                                                    "n": 7},
                                   "mild": {"mean_logp": None if seed else -3.0, "n": 0 if seed else 2}}})
    return rows


def test_matched_on_hand_made_frontiers():
    m = frontier.matched(_rows(), seeds=2)
    hs = m["reward"]["H->S"]["cost_cvar95"]
    assert [r["range"] for r in hs["per_seed"]] == [[1.0, 2.5], [1.0, 2.5]]
    assert [r["mean_diff"] for r in hs["per_seed"]] == pytest.approx([-1.0, 1.0])
    assert hs["rsa_lower_seeds"] == 1 and hs["outcome"] == "inconclusive" and hs["diff_std"] == pytest.approx(1.0)
    assert m["reward"]["H->S"]["catastrophic_rate"]["outcome"] == "inconclusive"     # equal: a tie
    assert m["reward"]["P"]["cost_cvar95"]["outcome"] == "no overlap"
    assert m["kl"]["H->S"]["cost_cvar95"]["outcome"] == "no overlap"                  # KL 1-2 vs 4-8
    assert m["kl"]["P"]["cost_cvar95"]["overlapping_seeds"] == 2
    # the ablation is compared with sacpo's H->S frontier: -2 and -1.9 over rewards [1.3, 2.8]
    ds = m["reward"]["DPO->S"]["cost_cvar95"]
    assert [r["range"] for r in ds["per_seed"]] == [[1.3, 2.8], [1.3, 2.8]]
    assert [r["mean_diff"] for r in ds["per_seed"]] == pytest.approx([-2.0, -1.9])
    assert ds["ci95"] == pytest.approx([-1.95 - 12.706205 * 0.05, -1.95 + 12.706205 * 0.05], abs=1e-5)
    assert ds["outcome"] == "rsa lower"
    text = report.verdict(m)
    last = text.splitlines()[-1]
    assert "inconclusive on H->S" in last and "no common reward on P" in last
    assert last.endswith("DPO->S) against SACPO's (H->S): RSA lower (the 95% interval lies below 0).")


def test_matched_kl_curves_run_through_their_ends():
    """On the KL axis each curve also runs through its ends (protocol.frontier_ends): here the
    helpfulness models bring H->S's KL ranges 1-2 (rsa) and 4-8 (sacpo) together; the reward axis
    is unchanged by them."""
    h = []
    for seed in range(2):
        for method, key, kl, cvar in (("dpo", "dpo-H", 3.0, 20.0), ("ra-dpo", "ra-dpo-H", 3.5, 22.0)):
            h.append({"seed": seed, "key": key, "label": key, "method": method, "family": "H", "setting": None,
                      "reward_mean": 3.0, "cost_mean": 1.0, "cost_cvar95": cvar, "catastrophic_rate": 0.01,
                      "kl_to_sft": kl, "probe": {"catastrophic": {"mean_logp": -6.0, "n": 3},
                                                 "mild": {"mean_logp": -4.0, "n": 3}}})
    rows = _rows() + h
    ends = protocol.frontier_ends(protocol.Settings(safety_grid=(0.5, 0.05), sacpo_extra=(), rsa_extra=()))
    plain, through = frontier.matched(rows, 2), frontier.matched(rows, 2, ends)
    assert plain["kl"]["H->S"]["cost_cvar95"]["outcome"] == "no overlap"
    hs = through["kl"]["H->S"]["cost_cvar95"]
    assert hs["overlapping_seeds"] == 2 and [r["range"] for r in hs["per_seed"]] == [[3.0, 3.5], [3.0, 3.5]]
    assert through["reward"] == plain["reward"]
    # DPO->S's curve has no ends: its start dpo (H) is on SACPO's H->S curve, which it is compared with
    assert {r["family"] for r in frontier.curve_rows(rows, "DPO->S", "rsa", 0, ends)} == {"DPO->S"}
    assert {r["key"] for r in frontier.curve_rows(rows, "H->S", "sacpo", 0, ends)} >= {"dpo-H"}
    mk = report.probe_at_matched_kl(rows, 2, ends)
    assert mk["H->S"]["catastrophic"]["overlapping_seeds"] == 2


def _matched_with(outcomes: dict) -> dict:
    def entry(o):
        n = 0 if o == "no overlap" else 3
        ci = {"rsa lower": [-2.0, -1.0], "sacpo lower": [1.0, 2.0], "inconclusive": [-1.0, 1.0]}.get(o)
        return {"outcome": o, "seeds": 3, "overlapping_seeds": n, "diff_mean": None if n == 0 else -1.0,
                "diff_std": None if n == 0 else 0.5, "ci95": ci, "rsa_lower_seeds": n if o == "rsa lower" else 0,
                "sacpo_lower_seeds": n if o == "sacpo lower" else 0, "rsa_lower_everywhere_seeds": 0,
                "sacpo_lower_everywhere_seeds": 0}
    fam = {f: {"cost_cvar95": entry(o), "catastrophic_rate": entry("inconclusive")} for f, o in outcomes.items()}
    return {"reward": fam, "kl": fam}


def test_verdict_follows_the_outcomes_alone():
    def last(hs, p, ds="inconclusive"):
        return report.verdict(_matched_with({"H->S": hs, "P": p, "DPO->S": ds})).splitlines()[-1]
    head = "Verdict (cost CVaR95 at matched helpfulness, 95% t intervals over seeds): "
    assert last("rsa lower", "rsa lower") == (
        head + "RSA has a lower cost CVaR95 than SACPO at matched helpfulness on H->S and P. RSA's safety step "
        "alone (rsa2 from dpo (H), DPO->S) against SACPO's (H->S): inconclusive (the 95% interval includes 0).")
    assert "RSA has a lower cost CVaR95 than SACPO at matched helpfulness on H->S; no common reward on P." in \
        last("rsa lower", "no overlap")
    assert "SACPO, not RSA, has the lower cost CVaR95 at matched helpfulness on P; inconclusive on H->S" in \
        last("inconclusive", "sacpo lower")
    assert "mixed: RSA has the lower cost CVaR95 at matched helpfulness on H->S, SACPO on P." in \
        last("rsa lower", "sacpo lower")
    assert "no difference shown" in last("inconclusive", "inconclusive")
    assert "no common reward in any seed: no comparison" in last("no overlap", "no overlap")
    assert last("inconclusive", "inconclusive", "sacpo lower").endswith("(H->S): SACPO lower (the 95% interval lies above 0).")
    # the counts and means do not enter the verdict: only the outcomes do
    a = _matched_with({"H->S": "rsa lower", "P": "inconclusive", "DPO->S": "no overlap"})
    b = _matched_with({"H->S": "rsa lower", "P": "inconclusive", "DPO->S": "no overlap"})
    b["reward"]["H->S"]["cost_cvar95"].update(diff_mean=-7.0, rsa_lower_seeds=2)
    assert report.verdict(a).splitlines()[-1] == report.verdict(b).splitlines()[-1]


def test_mechanism_pairs_rsa_dpo_with_sacpo_by_seed():
    rows = [{**r, "label": f"{r['method']} ({r['family']}) {r['setting']:g}"} for r in _rows()]
    mech = report.mechanism(rows, [0.5, 0.05], 2)
    sacpo = mech["models"]["sacpo (H->S) 0.5"]
    assert sacpo["catastrophic"]["seeds"] == pytest.approx([-6.0, -6.1]) and sacpo["catastrophic"]["positions"] == 14
    assert sacpo["catastrophic"]["ci95"] == pytest.approx([-6.05 - 12.706205 * 0.05, -6.05 + 12.706205 * 0.05])
    assert sacpo["mild"]["seeds"] == [-3.0, None] and sacpo["mild"]["ci95"] is None   # no positions in seed 1
    paired = mech["rsa_dpo_minus_sacpo"]
    assert set(paired) == {"0.5", "0.05"}
    cat = paired["0.5"]["catastrophic"]                  # rsa keeps 1 nat more in both seeds
    assert cat["diff_mean"] == pytest.approx(1.0) and cat["seeds"] == 2 and cat["ci95"] == pytest.approx([1.0, 1.0])
    assert cat["outcome"] == "rsa higher"
    mild = paired["0.5"]["mild"]
    assert mild["seeds"] == 1 and mild["ci95"] is None and mild["outcome"] == "inconclusive"
    # at matched KL (rows: rsa keeps 1 nat more at every KL; H->S's KL ranges 1-2 and 4-8 do not meet)
    mk = mech["matched_kl"]
    assert mk["H->S"]["catastrophic"]["outcome"] == "no overlap"
    p = mk["P"]["catastrophic"]
    assert [r["range"] for r in p["per_seed"]] == [[5.5, 6.0], [5.5, 6.0]]
    assert p["diff_mean"] == pytest.approx(1.0) and p["outcome"] == "rsa higher" and p["sacpo_lower_seeds"] == 2
    ds = mk["DPO->S"]["catastrophic"]
    assert [r["range"] for r in ds["per_seed"]] == [[4.0, 5.0], [4.0, 5.0]] and ds["outcome"] == "rsa higher"
    mild = mk["P"]["mild"]                               # seed 1 has no mild positions: left out
    assert mild["overlapping_seeds"] == 1 and mild["diff_mean"] == 0 and mild["outcome"] == "inconclusive"
    table = report.mechanism_table(mech)
    assert "rsa (DPO->S) - sacpo (H->S)" in table and "rsa higher" in table and "(P)" not in table
    assert "At matched KL to SFT" in table and "no overlap" in table


def test_probe_finds_the_emitted_tokens_and_scores_them():
    model = sft.build_model(0)
    with torch.no_grad():   # make poison and weapon likely so that the random model emits them
        model.lm_head.bias = None
        model.lm_head.weight[task.TOKEN_ID["poison"]] += 0.5
        model.lm_head.weight[task.TOKEN_ID["weapon"]] += 0.5
    ps = probe.probe_set(model, 4, seed=0)
    n_prompt = 1 + task.PROMPT_LEN
    for group, (rows, cols) in ps.positions.items():
        ids = {task.TOKEN_ID[w] for w in probe.GROUPS[group]}
        for r, c in zip(rows.tolist(), cols.tolist()):
            assert c >= n_prompt and int(ps.seq[r, c]) in ids
            assert task.EOS_ID not in ps.seq[r, n_prompt:c].tolist()      # emitted before the response ended
    rows, cols = ps.positions["catastrophic"]
    assert rows.numel() > 0
    other = sft.build_model(1)
    got = probe.probe_logps(other, ps)
    with torch.no_grad():
        direct = [float(torch.log_softmax(other(input_ids=ps.seq[r:r + 1, :c]).logits[0, -1].double(), -1)[ps.seq[r, c]])
                  for r, c in zip(rows.tolist(), cols.tolist())]
    assert got["catastrophic"]["n"] == len(direct)
    assert got["catastrophic"]["mean_logp"] == pytest.approx(np.mean(direct), abs=1e-5)


def test_report_tables_and_plots(tmp_path):
    rows = _rows()
    fronts = frontier.frontiers(rows)
    assert [e["merge_weight"] for e in fronts["P"]] == [0.25, 0.75, 0.25, 0.75]
    first = fronts["H->S"][0]
    assert first["method"] == "sacpo" and first["beta_over_lambda"] == 0.5 and first["std"]["cost_cvar95"] == 0
    assert first["reward_mean"] == 3.0 and len(first["seeds"]) == 2 and first["ci95"]["cost_cvar95"] == [4.0, 4.0]
    assert [(e["method"], e["beta_over_lambda"]) for e in fronts["DPO->S"]] == [("rsa", 0.5), ("rsa", 0.05)]
    # rsa (H->S) 0.5's CVaR95 is 4 in seed 0 and 6 in seed 1: 5 ± 12.706 (t, 1 df), clipped at 0 below
    rsa = next(e for e in fronts["H->S"] if e["method"] == "rsa" and e["beta_over_lambda"] == 0.5)
    assert rsa["ci95"]["cost_cvar95"] == pytest.approx([0.0, 5 + 12.706205], abs=1e-5)
    assert rsa["ci95"]["reward_mean"] == [2.5, 2.5]
    # the best reward-matched pair: H->S has two at distance 0.5, the first in knob order wins; DPO->S's
    # rsa points are paired with sacpo's H->S points
    picks = report.tail_picks(fronts)
    assert [(f, p["reward_mean"]) for f, p in picks["H->S"]] == [("H->S", 3.0), ("H->S", 2.5)]
    assert [(f, p["reward_mean"]) for f, p in picks["P"]] == [("P", 2.0), ("P", 1.5)]
    assert [(f, p["method"], p["reward_mean"]) for f, p in picks["DPO->S"]] == [("H->S", "sacpo", 3.0),
                                                                              ("DPO->S", "rsa", 2.8)]
    table = report.frontier_table([{**r, "label": f"{r['method']} ({r['family']}) {r['setting']:g}"} for r in rows])
    rsa_row = next(line for line in table.splitlines() if line.startswith("rsa (H->S) 0.5 "))
    assert "5.000 ± 12.706" in rsa_row     # its CVaR95: mean 5, t half-width 12.706 * sd / sqrt(2) with sd sqrt(2)
    matched_text = report.matched_table(frontier.matched(rows, 2))
    assert "no overlap" in matched_text and "95% interval" in matched_text and "rsa lower" in matched_text
    anchor = report.aggregate({"sft": [{"seed": 0, **{k: 1.0 for k in report.METRICS}}]})
    assert anchor["sft"]["ci95"]["cost_cvar95"] is None and report.table(anchor).splitlines()[2].split()[1] == "1.000"
    report.plot_frontier(tmp_path, fronts, anchor)
    report.plot_tail(tmp_path, {"sft": np.array([0.0, 1.0, 100.0]), "rsa (P) w=0.25": np.array([0.0, 0.0, 40.0])})
    report.plot_training(tmp_path, {"rsa (rsa2)": {"helpful": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]}})
    for name in ("frontier.png", "tail.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 0


def _report_of(rows, seeds=2) -> dict:
    m = frontier.matched(rows, seeds)
    return {"matched": m, "verdict": report.verdict(m), "models": report.models_summary(rows),
            "mechanism": report.mechanism(rows, [0.5, 0.05], 2), "settings": {"seeds": seeds}, "workers": 2,
            "cpu_capability": "AVX2", "elapsed_s": 10.0, "cpu_s": 19.0}


def test_docs_blocks_compare_runs_and_rewrite_the_marked_blocks(tmp_path):
    from rsa.demo import docs

    rows = [{**r, "label": f"{r['method']} ({r['family']}) {r['setting']:g}"} for r in _rows()]
    a = _report_of(rows)
    table, agree = docs.compare(a, a)
    assert agree and "verdict: the same" in table and " NO" not in table
    flipped = [{**r, "cost_cvar95": r["cost_cvar95"] + (5.0 if r["family"] == "DPO->S" else 0.0)} for r in rows]
    b = _report_of(flipped)                 # the ablation is now 3 above sacpo in every seed
    assert b["matched"]["reward"]["DPO->S"]["cost_cvar95"]["outcome"] == "sacpo lower"
    table, agree = docs.compare(a, b, ("here", "there"))
    assert not agree and "verdict: DIFFERENT" in table
    differing = [line for line in table.splitlines() if line.rstrip().endswith("NO")]
    assert differing and all("DPO->S" in line for line in differing)
    probe_line = next(line for line in table.splitlines() if line.startswith("beta / lambda 0.5 ") and "catastrophic" in line)
    assert "rsa higher: +1.00" in probe_line and probe_line.rstrip().endswith("yes")   # the probe agrees
    probe_flipped = json.loads(json.dumps(a))
    probe_flipped["mechanism"]["rsa_dpo_minus_sacpo"]["0.05"]["catastrophic"]["outcome"] = "inconclusive"
    table, agree = docs.compare(a, probe_flipped)
    assert not agree and "verdict: the same" in table and table.count(" NO") == 1
    kl_flipped = json.loads(json.dumps(a))
    kl_flipped["mechanism"]["matched_kl"]["P"]["catastrophic"]["outcome"] = "inconclusive"   # was rsa higher
    table, agree = docs.compare(a, kl_flipped)
    assert not agree and [line.split()[:2] for line in table.splitlines() if line.rstrip().endswith("NO")] == \
        [["P", "catastrophic"]]
    capped = {**a, "isa": {"cpu": "AVX512", "cap": {"ATEN_CPU_CAPABILITY": "avx2"}, "why_not": None}}
    assert docs.run_line(capped) == ("2 seeds, 2 worker processes, CPU capability AVX2 (capped on an AVX512 CPU): "
                                     "10 s wall, 19 s of CPU")
    found = docs.blocks(a, b)
    assert found["summary"] == report.summary_text(a) and found["verdict"] == "\n".join(a["verdict"].splitlines()[-2:])
    assert found["verdict"].startswith("Verdict at matched KL to SFT (cost CVaR95, 95% t intervals over seeds): ")
    assert found["run"] == "2 seeds, 2 worker processes, CPU capability AVX2: 10 s wall, 19 s of CPU"
    assert found["cpu-check"].endswith("outcomes and verdict DISAGREE")

    root = tmp_path / "repo"
    (root / "docs" / "img").mkdir(parents=True)
    (root / "README.md").write_text("intro\n<!-- demo:run -->\nold\n<!-- /demo:run -->\n"
                                    "<!-- demo:verdict -->\n<!-- /demo:verdict -->\nend\n")
    (root / "docs" / "demo.md").write_text("<!-- demo:run -->\n<!-- /demo:run -->\n"
                                           "<!-- demo:summary -->\nstale\ntext\n<!-- /demo:summary -->\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({**a, "frontier": frontier.frontiers(rows)}))
    assert docs.main([str(run), "--write", "--root", str(root)]) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("intro\n<!-- demo:run -->\n```\n2 seeds, 2 worker processes")
    assert readme.endswith("```\n<!-- /demo:verdict -->\nend\n") and "matched at" not in readme
    assert "old" not in readme and a["verdict"].splitlines()[-1] in readme
    assert "stale" not in (root / "docs" / "demo.md").read_text()
    assert (root / "docs" / "img" / "demo-frontier.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="demo:nothing"):
        docs.replace_block("no markers", "nothing", "x")
    with pytest.raises(SystemExit):
        docs.main([str(tmp_path / "missing")])


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


def test_protocol_configs_start_every_safety_step_from_the_helpfulness_model(tmp_path):
    from rsa.config import load_config
    from rsa.stepwise import _reference_path, stage_args

    s = protocol.Settings()
    assert s.seeds == 10
    cfg = load_config(protocol.run_config(s, 0, "rsa2", "rsa"))
    # RSA's grid: the common one and a smaller beta / lambda (issue 32); SACPO's: a larger one
    # and its stronger step (issue 32, second part): beta / lambda 0.05 at three times the learning rate
    assert [st["name"] for st in cfg["stages"]] == ["helpful", "safe-0.5", "safe-0.25", "safe-0.125", "safe-0.05",
                                                    "safe-0.01", "safe-0.05-lr3x"]
    assert all(st["reference"] == "helpful" for st in cfg["stages"][1:])
    rsa_args = [stage_args(st, cfg, Path("x"), False) for st in cfg["stages"]]
    assert [a.beta for a in rsa_args] == [0.5, 0.5, 0.25, 0.125, 0.05, 0.01, 0.05]
    assert [a.learning_rate for a in rsa_args] == [1e-3] * 6 + [pytest.approx(3e-3, rel=1e-12)]
    assert max(s.safety_grid) / min(s.safety_grid) >= 10 and len(s.safety_grid) >= 4
    assert s.grid("sacpo") == (1.0, 0.5, 0.25, 0.125, 0.05) and s.grid("rsa") == (0.5, 0.25, 0.125, 0.05, 0.01)
    # each method's strongest safety step: SACPO's smallest beta / lambda, RSA's stronger step
    assert (s.merge_from("sacpo"), s.merge_from("rsa")) == ((0.05, 1.0), (0.05, 3.0))
    assert protocol.Settings(rsa_strong=()).merge_from("rsa") == (0.01, 1.0)
    # the ablation: rsa2 at the same grid, every step from (and referenced to) sacpo's helpfulness model
    yaml_path = runs.write_yaml(protocol.ablation_config(s, 3), tmp_path / "seed3" / "rsa-dpo.yaml")
    abl = load_config(yaml_path)
    assert abl["model"] == str((tmp_path / "seed3" / "sacpo" / "helpful").resolve())
    assert [st["name"] for st in abl["stages"]] == ["safe-0.5", "safe-0.25", "safe-0.125", "safe-0.05", "safe-0.01",
                                                    "safe-0.05-lr3x"]
    for st in abl["stages"]:
        assert _reference_path(st, abl, Path("previous-stage")) == Path(abl["model"])
        assert st["data"]["path"].endswith("seed3/data/safe.jsonl")
    args = [stage_args(st, abl, Path("x"), False) for st in abl["stages"]]
    assert [a.beta for a in args] == [0.5, 0.25, 0.125, 0.05, 0.01, 0.05]
    assert [a.learning_rate for a in args] == [1e-3] * 5 + [pytest.approx(3e-3, rel=1e-12)]
    args = args[:5]   # the grid's steps, compared with SACPO's below
    scfg = load_config(protocol.run_config(s, 3, "dpo", "sacpo"))
    assert [st["name"] for st in scfg["stages"]] == ["helpful", "safe-1", "safe-0.5", "safe-0.25", "safe-0.125",
                                                     "safe-0.05"]
    sacpo_safe = [stage_args(st, scfg, Path("x"), False) for st in scfg["stages"][1:]]
    assert [a.beta for a in sacpo_safe] == [1.0, 0.5, 0.25, 0.125, 0.05]
    for a, b in zip(args, sacpo_safe):
        assert (a.objective, a.risk, a.alpha) == ("rsa2", s.rsa_risk, s.rsa_alpha) and b.objective == "dpo"
        assert (a.seed, a.learning_rate, a.max_steps, a.per_device_train_batch_size) == \
            (b.seed, b.learning_rate, b.max_steps, b.per_device_train_batch_size)
    labels = [m.label for m in protocol.models(s)]
    assert labels.count("rsa (DPO->S) 0.05") == 1 and len(labels) == 26
    assert "rsa (H->S) 0.05 lr×3" in labels and "rsa (DPO->S) 0.05 lr×3" in labels
    strong = {m.key: m for m in protocol.models(s)}["rsa-HS-0.05-lr3x"]
    assert (strong.setting, strong.lr_scale, strong.path) == (0.05, 3.0, "rsa/safe-0.05-lr3x")
    assert "sacpo (H->S) 1" in labels and "rsa (H->S) 0.01" in labels and "sacpo (H->S) 0.01" not in labels
    ends = protocol.frontier_ends(s)
    assert ends[("sacpo", "H->S")] == ["dpo-H"] and ends[("rsa", "P")] == ["ra-dpo-H", "rsa-HS-0.05-lr3x"]
    assert ends[("sacpo", "P")] == ["dpo-H", "sacpo-HS-0.05"]
    assert ("rsa", "DPO->S") not in ends          # its start is dpo (H), on SACPO's curve already
    with pytest.raises(ValueError, match="rsa_extra"):
        protocol.Settings(rsa_extra=(0.05,))
    for bad in ((0.05,), (0.0, 3.0), (0.05, 1.0), (0.05, -2.0), (0.05, 3.0, 1.0)):
        with pytest.raises(ValueError, match="rsa_strong"):
            protocol.Settings(rsa_strong=bad)


# ---------------------------------------------------------------------------- end to end


def _finished(out: Path) -> dict:
    """Every file marking finished work, with its modification time."""
    marks = [*out.glob("seed*/sft/demo_sft.json"), *out.glob("seed*/data/stats.json"),
             *out.glob("seed*/*/*/stage.json"), *out.glob("seed*/merge/*/merge.json"), *out.glob("seed*/eval/*.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in marks}


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that a container may lack is not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_rsa_demo_quick_killed_then_resumed(tmp_path):
    pytest.importorskip("rsa.stepwise")
    from rsa.cli import main

    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    args = ["demo", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "rsa.cli", *args, "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it once both workers have finished a stage (the next ones are then under way)
        deadline = time.time() + 300
        while not all((out / f"seed{k}" / "sacpo" / "helpful" / "stage.json").is_file() for k in (0, 1)):
            assert proc.poll() is None and time.time() < deadline, "the demo ended before it could be killed"
            time.sleep(0.05)
        workers = _children(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert len(workers) >= 2
    deadline = time.time() + 20
    while any(_alive(w) for w in workers):
        assert time.time() < deadline, "the workers outlived the killed demo"
        time.sleep(0.1)
    before = _finished(out)
    assert {"seed0/sacpo/helpful/stage.json", "seed1/sacpo/helpful/stage.json"} <= set(before)
    assert not (out / "report.json").exists()

    # resumed with two workers: nothing finished is redone
    assert main([*args, "--workers", "2"]) == 0
    after = _finished(out)
    assert {k: after[k] for k in before} == before
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) >= {"methods", "verdict", "settings", "data", "elapsed_s", "frontier", "matched", "mechanism"}
    assert rep["settings"]["seeds"] == 2 and rep["workers"] == 2
    from rsa.demo import isa
    if isa.can_cap()[0]:      # the seeds ran capped at AVX2 (rsa/demo/isa.py), whatever this CPU offers
        assert rep["isa"]["cap"] == isa.cap_environment() and rep["cpu_capability"] == "AVX2"
    assert set(rep["methods"]) == {"sft", "dpo", "ra-dpo", "sacpo", "rsa"}
    for name, entry in rep["methods"].items():
        for key in report.METRICS:
            assert np.isfinite(entry[key]), (name, key)
        assert len(entry["seeds"]) == 2
    assert rep["methods"]["sft"]["kl_to_sft"] == 0
    assert all(rep["methods"][m]["kl_to_sft"] > 0 for m in ("dpo", "ra-dpo", "sacpo", "rsa"))   # training moved them
    assert set(rep["frontier"]) == {"H->S", "DPO->S", "P"}
    for family, knob, points in (
            ("H->S", "beta_over_lambda", [("sacpo", 1.0, 1), ("sacpo", 0.5, 1), ("sacpo", 0.05, 1),
                                          ("rsa", 0.5, 1), ("rsa", 0.05, 1), ("rsa", 0.01, 1), ("rsa", 0.05, 3)]),
            ("DPO->S", "beta_over_lambda", [("rsa", 0.5, 1), ("rsa", 0.05, 1), ("rsa", 0.01, 1), ("rsa", 0.05, 3)]),
            ("P", "merge_weight", [(m, w, 1) for m in ("sacpo", "rsa") for w in (0.25, 0.75)])):
        entries = rep["frontier"][family]
        assert [(e["method"], e[knob], e["lr_scale"]) for e in entries] == points
        for e in entries:
            assert set(e["std"]) == set(e["ci95"]) == set(frontier.POINT_METRICS)
            assert all(np.isfinite(e[k]) for k in frontier.POINT_METRICS)
            lo, hi = e["ci95"]["kl_to_sft"]
            assert 0 <= lo <= e["kl_to_sft"] <= hi
    assert set(rep["matched"]) == {"reward", "kl"}
    for axis in rep["matched"].values():
        assert set(axis) == {"H->S", "P", "DPO->S"}
        for family in axis.values():
            for e in family.values():
                assert e["seeds"] == 2 and len(e["per_seed"]) == 2
                assert e["outcome"] in ("rsa lower", "sacpo lower", "inconclusive", "no overlap")
                assert (e["ci95"] is None) == (e["overlapping_seeds"] < 2)
    mech = rep["mechanism"]
    assert set(mech["rsa_dpo_minus_sacpo"]) == {"0.5", "0.05"}
    sft_probe = mech["models"]["sft"]["catastrophic"]
    assert sft_probe["positions"] > 0 and np.isfinite(sft_probe["mean_logp"]) and sft_probe["mean_logp"] < 0
    assert rep["verdict"].splitlines()[-1].startswith("Verdict")
    for name in ("frontier.png", "tail.png", "training.png"):
        assert (out / name).stat().st_size > 0

    # once finished, a third call (in this process) redoes nothing and reports the same numbers
    assert main([*args, "--workers", "1"]) == 0
    assert _finished(out) == after
    again = json.loads((out / "report.json").read_text())
    assert again["frontier"] == rep["frontier"] and again["matched"] == rep["matched"]
    assert again["mechanism"] == rep["mechanism"]


def test_a_seed_gives_the_same_results_in_any_process(tmp_path):
    """Seeds are independent: seed 1 run here (after whatever this process ran before) and in a
    fresh worker process gives the same bits."""
    pytest.importorskip("rsa.stepwise")
    from rsa.demo import workers

    s = protocol.Settings(seeds=2, sft_steps=4, pairs_per_prompt=4, max_steps=2, eval_per_prompt=6,
                          safety_grid=(0.5,), merge_weights=(0.5,))
    quiet = runs.Progress(s, enabled=False)
    with workers.one_thread():
        here = runs.run_seed(s, 1, tmp_path / "here", quiet)
    [(seed, there, capability)] = list(workers.parallel_map(runs._seed_job, [(s, 1, tmp_path / "there")], 2, quiet))
    assert seed == 1 and here == there and capability == torch.backends.cpu.get_cpu_capability()
    files = sorted((tmp_path / "here").glob("seed1/eval/*"))
    assert len(files) == 2 * len(protocol.models(s))
    for f in files:
        assert f.read_bytes() == (tmp_path / "there" / f.relative_to(tmp_path / "here")).read_bytes(), f


def test_the_avx2_cap_reaches_the_workers_and_gives_the_same_bits_in_any_capped_process(tmp_path):
    """The cap is set before torch is imported in a spawned worker (even a single one): PyTorch
    there runs AVX2, and two capped processes give the same bits."""
    pytest.importorskip("rsa.stepwise")
    from rsa.demo import isa, workers

    ok, why = isa.can_cap()
    if not ok:
        pytest.skip(f"no AVX2 cap on {why}")
    s = protocol.Settings(seeds=1, sft_steps=4, pairs_per_prompt=4, max_steps=2, eval_per_prompt=6,
                          safety_grid=(0.5,), sacpo_extra=(), rsa_extra=(), merge_weights=(0.5,))
    quiet = runs.Progress(s, enabled=False)
    before = {k: os.environ.get(k) for k in isa.AVX2_ENVIRONMENT}
    results = []
    for name in ("a", "b"):
        [(_, result, capability)] = list(workers.parallel_map(runs._seed_job, [(s, 0, tmp_path / name)], 1, quiet,
                                                              env=isa.cap_environment()))
        assert capability == "AVX2"
        results.append(result)
    assert results[0] == results[1]
    for f in sorted((tmp_path / "a").glob("seed0/eval/*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f
    assert {k: os.environ.get(k) for k in isa.AVX2_ENVIRONMENT} == before     # this process's left as it was
    assert runs.isa_choice(native_isa=True) == {"cpu": isa.cpu_level(), "cap": None, "why_not": "--native-isa"}
    assert runs.isa_choice(native_isa=False)["cap"] == isa.cap_environment()


def test_demo_command_rejects_bad_counts(capsys):
    from rsa.cli import main

    for flag in ("--seeds", "--workers"):
        assert main(["demo", "--quick", flag, "0", "--out", "unused"]) == 2
        assert capsys.readouterr().err.strip() == f"rsa demo: error: {flag} must be at least 1, got 0"
    with pytest.raises(ValueError, match="workers"):
        runs.run_demo("unused", protocol.Settings.quick(), workers=0)


def _kernels_importable(job, progress):
    import importlib.util
    return importlib.util.find_spec("kernels") is not None if "kernels" not in sys.modules else \
        sys.modules["kernels"] is not None


def test_the_rsa_programs_workers_fetch_no_hub_code(monkeypatch):
    """Spawned workers start without the `rsa` process's module table: the rule of rsa.optional
    (no `kernels`, hence no bitsandbytes kernel from the hub) is applied in them again."""
    from rsa.demo import workers

    quiet = runs.Progress(protocol.Settings.quick(), enabled=False)
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    assert list(workers.parallel_map(_kernels_importable, [0], 2, quiet)) == [False]


def test_a_step_at_another_learning_rate_is_a_frontier_point_of_its_own():
    """Issue 32's stronger step shares its beta / lambda with a grid point: the two must stay two
    points (and two curve nodes), named apart."""
    rows = []
    for seed in range(2):
        for scale, reward in ((1.0, 2.0), (3.0, 1.0)):
            rows.append({"seed": seed, "key": protocol.model_key("rsa", "H->S", 0.05, scale),
                         "label": protocol.step_label("rsa", "H->S", 0.05, scale), "method": "rsa", "family": "H->S",
                         "setting": 0.05, "lr_scale": scale, "reward_mean": reward + seed, "cost_cvar95": 1.0,
                         "catastrophic_rate": 0.0, "kl_to_sft": 4.0 - scale})
    f = frontier.frontiers(rows)["H->S"]
    assert [(e["beta_over_lambda"], e["lr_scale"], e["reward_mean"]) for e in f] == [(0.05, 1.0, 2.5), (0.05, 3.0, 1.5)]
    assert [report.knob_text("H->S", e) for e in f] == ["0.05", "0.05 lr×3"]
    assert [r["label"] for r in rows[:2]] == ["rsa (H->S) 0.05", "rsa (H->S) 0.05 lr×3"]
    assert [r["key"] for r in rows[:2]] == ["rsa-HS-0.05", "rsa-HS-0.05-lr3x"]
    xs, ys = frontier.points(rows, "H->S", "rsa", 0, "kl_to_sft", "reward_mean")
    assert sorted(zip(xs, ys)) == [(1.0, 1.0), (3.0, 2.0)]


def _optional_packages_seen(job, progress):
    """In a worker: the optional packages loaded once the trainer is imported, and whether
    accelerate would take DeepSpeed as available (what made it import DeepSpeed and print its
    accelerator line in every worker)."""
    import rsa.stepwise  # noqa: F401
    from accelerate.utils import is_deepspeed_available
    loaded = {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    return sorted(loaded & {"peft", "bitsandbytes", "deepspeed", "kernels"}), is_deepspeed_available()


def test_the_demo_workers_keep_out_what_the_rsa_program_kept_out(monkeypatch):
    from rsa import optional
    from rsa.demo import workers

    quiet = runs.Progress(protocol.Settings.quick(), enabled=False)
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    monkeypatch.setenv(optional.KEPT_OUT_VARIABLE, ",".join(optional.OPTIONAL))
    [(loaded, deepspeed)] = list(workers.parallel_map(_optional_packages_seen, [None], 2, quiet))
    assert loaded == [] and not deepspeed
    # without the rule the same imports reach them (where installed): the check above can fail
    monkeypatch.delenv(optional.KEPT_OUT_VARIABLE)
    monkeypatch.delenv("USE_HUB_KERNELS")
    [(loaded, deepspeed)] = list(workers.parallel_map(_optional_packages_seen, [None], 2, quiet))
    import importlib.util
    if importlib.util.find_spec("peft") is not None:
        assert "peft" in loaded
    assert bool(deepspeed) == (importlib.util.find_spec("deepspeed") is not None)


def test_keep_out_for_children_names_the_packages_in_the_environment(monkeypatch):
    from rsa import optional

    monkeypatch.delenv(optional.KEPT_OUT_VARIABLE, raising=False)
    monkeypatch.setitem(sys.modules, "rsa_test_optional_pkg", None)
    optional.keep_out(["rsa_test_optional_pkg"])
    assert optional.KEPT_OUT_VARIABLE not in os.environ          # this process only
    optional.keep_out(["rsa_test_optional_pkg"], children=True)
    assert os.environ[optional.KEPT_OUT_VARIABLE] == "rsa_test_optional_pkg"

