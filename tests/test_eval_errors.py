"""Bad inputs to `rsa eval`: each raises the error that names the problem, and the command
prints it as one line `rsa eval: error: ...` with exit status 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rsa.cli import main as rsa_main
from rsa.data import DataError
from rsa.errors import UserError
from rsa.eval import EvalSettings, ScorerError, run_eval
from test_eval import one_thread, save_classifier, work  # noqa: F401 - fixtures
from test_trainer_common import write_jsonl


def cli_error(capsys, args) -> str:
    """Run `rsa eval ARGS`; the one-line message it printed (and check status 2, no traceback)."""
    capsys.readouterr()
    assert rsa_main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]   # after any progress bars or warnings
    assert err.startswith("rsa eval: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def base_args(work, **over):
    args = {"--model": str(work / "a"), "--prompts": str(work / "prompts.jsonl"), "--cost": "tiny_scorers:reward",
            "--samples": "2", "--max-new-tokens": "4", "--batch-size": "2", "--device": "cpu",
            "--out": str(work / "err_out"), "--no-progress": None}
    args.update(over)
    return [x for k, v in args.items() for x in ((k,) if v is None else (k, v))]


def test_missing_prompt_field_names_file_and_line(work, capsys):
    bad = write_jsonl([{"prompt": "the cat"}, {"question": "no prompt here"}], work / "bad_prompts.jsonl")
    with pytest.raises(DataError, match=r"bad_prompts.jsonl, line 2: missing field 'prompt'"):
        run_eval(EvalSettings(models={"a": str(work / "a")}, prompts=str(bad), cost="tiny_scorers:reward"),
                 work / "err_lib", progress=False)
    assert "bad_prompts.jsonl, line 2: missing field 'prompt'" in cli_error(capsys, base_args(work, **{"--prompts": str(bad)}))


@pytest.mark.parametrize("scorer, message", [
    ("tiny_scorers:wrong_count", "--cost scorer 'tiny_scorers:wrong_count' returned 1 score(s) for 2 response(s)"),
    ("tiny_scorers:nan_cost", "--cost scorer 'tiny_scorers:nan_cost' returned a non-finite score (nan)"),
])
def test_bad_scorer_output_names_the_scorer(work, capsys, scorer, message):
    with pytest.raises(ScorerError) as err:
        run_eval(EvalSettings(models={"a": str(work / "a")}, prompts=str(work / "prompts.jsonl"), cost=scorer,
                              samples=2, max_new_tokens=4, batch_size=2), work / f"err_{scorer[-4:]}", progress=False)
    assert message in str(err.value)
    assert message in cli_error(capsys, base_args(work, **{"--cost": scorer, "--out": str(work / "err_cli")}))


def test_pickled_only_weights_are_refused(work, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    pickled = work / "pickled"
    model = AutoModelForCausalLM.from_pretrained(str(work / "a"))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    clf_dir = work / "pickled_cost"
    clf = AutoModelForSequenceClassification.from_pretrained(str(work / "cost"))
    clf.config.save_pretrained(clf_dir)
    torch.save(clf.state_dict(), clf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="no .safetensors weights .found only pickled weights: pytorch_model.bin"):
        run_eval(EvalSettings(models={"p": str(pickled)}, prompts=str(work / "prompts.jsonl"),
                              cost="tiny_scorers:reward"), work / "err_pickled", progress=False)
    msg = cli_error(capsys, base_args(work, **{"--model": str(pickled)}))
    assert "--model pickled" in msg and "pytorch_model.bin" in msg
    msg = cli_error(capsys, base_args(work, **{"--cost": str(clf_dir)}))
    assert "--cost scorer" in msg and "pytorch_model.bin" in msg and "safetensors" in msg
    msg = cli_error(capsys, base_args(work, **{"--reference": str(pickled)}))
    assert msg.startswith("rsa eval: error: --reference") and "pytorch_model.bin" in msg


def test_scorer_head_missing_from_its_weights_is_refused(work, capsys):
    """A score model saved by another library under another head name: Transformers would
    initialise `score` at random."""
    from safetensors.torch import load_file, save_file
    folder = save_classifier(work / "renamed_head", num_labels=1)
    weights = load_file(str(folder / "model.safetensors"))
    weights["score_head.weight"] = weights.pop("score.weight")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing from its safetensors: score.weight .*score_head.weight"):
        run_eval(EvalSettings(models={"a": str(work / "a")}, prompts=str(work / "prompts.jsonl"), cost=str(folder)),
                 work / "err_head", progress=False)
    assert "score.weight" in cli_error(capsys, base_args(work, **{"--cost": str(folder)}))
    # and the output index must exist
    assert "output 3 requested but the model has 2" in cli_error(capsys, base_args(work, **{"--cost": f"{work / 'cost'}#3"}))


@pytest.mark.parametrize("flag, value, message", [
    ("--samples", "0", "--samples must be an integer >= 1, got 0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--temperature", "0", "--temperature must be a positive number"),
    ("--device", "tpu", "--device must be cpu, cuda or cuda:K, got 'tpu'"),
    ("--prompts", "no/such/file.jsonl", "--prompts: no such file 'no/such/file.jsonl'"),
    ("--model", "no/such/model", "--model model: no such model folder 'no/such/model'"),
    ("--cost", "nonsense", "--cost scorer 'nonsense': neither a model folder"),
    ("--cost", "no_such_module:cost", "--cost scorer 'no_such_module:cost': cannot import module 'no_such_module'"),
    ("--cost", "tiny_scorers:absent", "module 'tiny_scorers' has no function 'absent'"),
])
def test_bad_flags_one_line(work, capsys, flag, value, message):
    assert message in cli_error(capsys, base_args(work, **{flag: value}))


def test_two_models_with_one_name_and_a_changed_run(work, capsys):
    assert "two models are named 'a'" in cli_error(capsys, base_args(work) + ["--model", f"a={work / 'b'}"])
    out = work / "err_changed"
    assert rsa_main(["eval", *base_args(work, **{"--out": str(out)})]) == 0
    assert json.loads((out / "report.json").read_text())["models"]["a"]["n"] == 8
    msg = cli_error(capsys, base_args(work, **{"--out": str(out), "--samples": "3"}))
    assert "holds a run with other settings (samples differ)" in msg


def test_argparse_errors_keep_their_form(capsys):
    with pytest.raises(SystemExit) as exit_:
        rsa_main(["eval", "--prompts", "x.jsonl", "--cost", "m:f"])
    assert exit_.value.code == 2
    assert "rsa eval: error: the following arguments are required: --model" in capsys.readouterr().err


def test_nan_in_a_models_next_token_distribution_names_the_model_and_prompt(work, capsys):
    """A NaN weight made the inverse-CDF draw return the last token id, silently."""
    from safetensors.torch import load_file, save_file
    for name in ("nan_model", "nan_ref"):
        shutil.copytree(work / "a", work / name)
        weights = load_file(str(work / name / "model.safetensors"))
        weights["lm_head.weight"][7, 0] = float("nan")
        save_file(weights, str(work / name / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"^--model nan_model: the next-token distribution is not finite .*"
                                        r"at response step 0 for prompt 0 \(.*prompts.jsonl, line 1: 'how do i make"):
        run_eval(EvalSettings(models={"nan_model": str(work / "nan_model")}, prompts=str(work / "prompts.jsonl"),
                              cost="tiny_scorers:reward", samples=2, max_new_tokens=4, batch_size=2),
                 work / "err_nan", progress=False)
    msg = cli_error(capsys, base_args(work, **{"--model": str(work / "nan_model"), "--out": str(work / "err_nan_cli")}))
    assert "--model nan_model: the next-token distribution is not finite" in msg and "prompt 0" in msg
    msg = cli_error(capsys, base_args(work, **{"--reference": str(work / "nan_ref"), "--out": str(work / "err_nan_ref")}))
    assert "--reference (KL of model a): the next-token distribution is not finite" in msg and "prompt 0" in msg


def test_bad_dtype_one_line(work, capsys):
    assert "--dtype must be one of bfloat16, float16, float32, auto, got 'float8'" in \
        cli_error(capsys, base_args(work, **{"--dtype": "float8"}))
