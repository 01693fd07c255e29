"""`rsa bench --train`'s pieces at tiny sizes: the contenders compute the same loss on the same
batch where they should (1 = 2 = 3: TRL's sigmoid DPO; 4 = 5 = 6: rsa2 with cvar:0.9), with the
same gradients; the runner measures every contender in its own process and the report shows
them. Nothing about speed is asserted."""
import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")
import torch  # noqa: E402

from rsa.bench.step_contenders import build_trainer, rsa_train_config  # noqa: E402
from rsa.bench.step_report import render_section, summarize  # noqa: E402
from rsa.bench.step_workload import make_models, make_pairs, make_tokenizer, sizes_for  # noqa: E402

SIZES = sizes_for("tiny", vocabs=(300,))
V = 300


def _perturbed(trainer):
    """Move the policy away from the reference (the same way for every contender) so the loss is not log 2."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def _loss_and_head_grad(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach().double(), trainer.model.get_output_embeddings().weight.grad.double().clone()


def _trl_batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(SIZES.pairs)]))


def test_every_contender_computes_the_same_loss_on_the_same_batch(tmp_path):
    pytest.importorskip("liger_kernel")
    got = {}
    for name in ("trl_dpo", "trl_liger", "rsa_dpo", "rsa_rsa2", "plain"):
        trainer = _perturbed(build_trainer(name, SIZES, V, str(tmp_path / name)))
        batch = _trl_batch(trainer)
        assert int(batch["completion_mask"].sum()) == 2 * SIZES.pairs * SIZES.response  # every response token
        got[name] = (*_loss_and_head_grad(trainer, batch), batch["input_ids"])
    # 5: `rsa train`'s own trainer, data file, tokenisation and collator (rsa/stepwise.py's path)
    from rsa.config import load_config
    from rsa.data import PairCollator, PairDataset, load_pairs
    from rsa.stepwise import stage_args
    from rsa.trainer import RSATrainer

    (tmp_path / "rt").mkdir()
    config = load_config(rsa_train_config(SIZES, V, tmp_path / "rt", "cpu", False))
    stage = config["stages"][0]
    args = stage_args(stage, config, tmp_path / "rt" / "out", progress=False)
    tok = make_tokenizer(V)
    data = PairDataset(load_pairs(stage["data"]["path"]), tok, args.max_length, args.max_prompt_length)
    policy, ref = make_models(SIZES, V)
    rt = _perturbed(RSATrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok))
    batch = rt._prepare_inputs(PairCollator(tok.pad_token_id)([data[i] for i in range(SIZES.pairs)]))
    got["rsa_train"] = (*_loss_and_head_grad(rt, batch), batch["input_ids"])

    assert torch.equal(got["rsa_train"][2], got["rsa_rsa2"][2])   # the same tokens through both pipelines
    assert abs(float(got["trl_dpo"][0]) - float(torch.log(torch.tensor(2.0)))) > 1e-3   # policy != reference
    for group in (("trl_dpo", "trl_liger", "rsa_dpo"), ("rsa_rsa2", "rsa_train", "plain")):
        loss0, grad0, _ = got[group[0]]
        for name in group[1:]:
            torch.testing.assert_close(got[name][0], loss0, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(got[name][1], grad0, rtol=1e-4, atol=1e-6, msg=name)
    assert abs(float(got["rsa_rsa2"][0]) - float(got["rsa_dpo"][0])) > 1e-4   # the risk term counts


def test_pairs_have_the_sizes_asked_for():
    pairs = make_pairs(SIZES, V, 3)
    tok = make_tokenizer(V)
    assert len(tok) == V
    for p in pairs:
        assert len(tok(p["prompt"])["input_ids"]) == SIZES.prompt
        assert len(tok(p["chosen"])["input_ids"]) == SIZES.response - 1   # + the end-of-sequence token
        assert tok.unk_token_id not in tok(p["chosen"])["input_ids"]
    assert make_pairs(SIZES, V, 3) == pairs   # the same pairs for every contender
    with pytest.raises(ValueError, match="mode"):
        sizes_for("huge")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`rsa bench --grid tiny --train-only`: the runner subprocess forks one child per contender."""
    from rsa.cli import main

    out = tmp_path_factory.mktemp("step")
    rc = main(["bench", "--grid", "tiny", "--train-only", "--device", "cpu", "--threads", "1", "--out", str(out)])
    return rc, out


def _liger_missing(train):
    errors = [(r["name"], r["error"]) for r in train["runs"] if "error" in r]
    return errors and all(n == "trl_liger" and "liger" in e for n, e in errors)


def test_runner_measures_every_contender_in_its_own_process(tiny_run):
    rc, out = tiny_run
    res = json.loads((out / "results.json").read_text())
    train = res["train_step"]
    if _liger_missing(train):
        pytest.skip("liger-kernel is not installed")
    errors = [(r["name"], r["error"]) for r in train["runs"] if "error" in r]
    assert rc == 0 and not errors, (errors, (out / "step.log").read_text()[-3000:])
    tiny = sizes_for("tiny")
    assert [(r["name"], r["vocab"]) for r in train["runs"]] == [
        (n, v) for v in tiny.vocabs for n in ("trl_dpo", "trl_liger", "rsa_dpo", "rsa_rsa2", "rsa_train", "plain")]
    pids = set()
    for r in train["runs"]:
        timed = [s for s in r["steps"] if not s["warmup"]]
        assert len(r["steps"]) == tiny.warmup + tiny.steps and len(timed) == tiny.steps, r["name"]
        assert r["grad_bytes"] == 4 * r["param_count"]   # float32, every parameter trained
        pids.add(r["pid"])
        for s in timed:
            assert s["total_s"] > 0 and s["peak_bytes"] >= 0
            assert s["body_forward_s"] > 0 and s["head_s"] > 0 and s["body_backward_s"] is not None
            parts = sum(s[k] for k in ("body_forward_s", "head_s", "body_backward_s", "optimizer_s"))
            assert parts <= s["total_s"] * 1.001, (r["name"], s)
    assert len(pids) == len(train["runs"])   # a fresh process each
    assert all(train["products"][str(v)]["four_products_s"] > 0 for v in tiny.vocabs)


def test_report_section_and_plot_come_from_the_measurements(tiny_run):
    rc, out = tiny_run
    res = json.loads((out / "results.json").read_text())
    train = res["train_step"]
    if any("error" in r for r in train["runs"]):
        pytest.skip("see test_runner_measures_every_contender_in_its_own_process")
    text = (out / "report.md").read_text()
    s = summarize(train)
    one, four = s[("trl_dpo", 256)], s[("rsa_rsa2", 256)]
    assert "### V = 256" in text and "### V = 1000" in text
    assert "rsa bench --grid tiny --device cpu --threads 1" in text and "--train-only" in text
    ms = four["time_s"] * 1e3
    assert f"| 4. RSADPOTrainer rsa2 cvar:0.9 | {ms:.3g} ms | {four['time_s'] / one['time_s']:.2f}x |" in text
    assert "(4) time <= 1/3 of plain Ra-DPO (6)" in text
    assert (out / "step.png").stat().st_size > 0
    assert "\n".join(render_section(res)) in text
