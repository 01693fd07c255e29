"""The `rsa` command as a whole: a user's mistake is one line `rsa COMMAND: error: ...` and exit
status 2; a bug keeps its traceback; --debug shows the traceback of a user error too."""
from __future__ import annotations

from pathlib import Path

import pytest

import rsa.commands.merge
from rsa.cli import main as rsa_main, user_error_message
from rsa.errors import UserError


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert rsa_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]   # after any progress bars or warnings
    assert err.startswith(f"rsa {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_train_missing_config(capsys, tmp_path):
    assert "config: no such file" in one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")])


def test_train_bad_config_value(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: sft\noutput_dir: runs\ndefaults: {risk: 'cvar:2'}\nstages: [{name: s, data: {path: d.jsonl}}]\n")
    assert "cvar" in one_line_error(capsys, ["train", str(cfg)])


def test_train_value_transformers_rejects(capsys, tmp_path):
    """A TrainingArguments value checked only by Transformers (on the committed tiny example)."""
    import yaml
    examples = Path(__file__).resolve().parents[1] / "examples"
    cfg = yaml.safe_load((examples / "tiny.yaml").read_text())
    cfg.update(model=str(examples / "sft"), output_dir=str(tmp_path / "runs"))
    cfg["defaults"]["lr_scheduler_type"] = "bogus"
    for stage in cfg["stages"]:
        stage["data"]["path"] = str(examples / stage["data"]["path"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    msg = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), "--no-progress"])
    assert "stage helpful: bogus is not a valid SchedulerType" in msg


def test_merge_bad_weight_and_missing_folder(capsys, tmp_path):
    assert "weight must be a number in [0, 1]" in one_line_error(
        capsys, ["merge", str(tmp_path), str(tmp_path), "--weight", "2", "--out", str(tmp_path / "o")])
    assert str(tmp_path / "missing") in one_line_error(
        capsys, ["merge", str(tmp_path / "missing"), str(tmp_path), "--weight", "0.5", "--out", str(tmp_path / "o")])


def test_bench_and_demo_bad_values(capsys, tmp_path):
    assert "--threads must be 'auto' or a positive integer" in one_line_error(
        capsys, ["bench", "--threads", "x", "--grid", "tiny", "--out", str(tmp_path)])
    assert "risk" in one_line_error(capsys, ["demo", "--risk", "nonsense", "--out", str(tmp_path)])


def test_argparse_error_form(capsys):
    with pytest.raises(SystemExit) as exit_:
        rsa_main(["merge", "a"])
    assert exit_.value.code == 2 and "rsa merge: error:" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError from inside numpy, reached from our code: not a user error."""
    from rsa.eval.sampling import row_seed

    monkeypatch.setattr(rsa.commands.merge, "run", lambda args: row_seed(-1, 0, 0))
    with pytest.raises(ValueError):
        rsa_main(["merge", "a", "b", "--weight", "0.5", "--out", "c"])

    def unpack(args):
        first, second = [1, 2, 3]   # a ValueError on one of our lines that is not a `raise`
    monkeypatch.setattr(rsa.commands.merge, "run", unpack)
    with pytest.raises(ValueError, match="too many values"):
        rsa_main(["merge", "a", "b", "--weight", "0.5", "--out", "c"])
    monkeypatch.setattr(rsa.commands.merge, "run", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        rsa_main(["merge", "a", "b", "--weight", "0.5", "--out", "c"])


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        rsa_main(["train", str(tmp_path / "nope.yaml"), "--debug"])


def test_what_counts_as_a_user_error(tmp_path):
    assert user_error_message(UserError("bad  thing")) == "bad  thing"
    try:
        open(tmp_path / "absent")
    except FileNotFoundError as err:
        assert user_error_message(err) == f"No such file or directory: {tmp_path / 'absent'}"
    assert user_error_message(ValueError("made by hand, never raised")) is None
    assert user_error_message(RuntimeError("x")) is None


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(rsa.commands.merge, "run", interrupted)
    assert rsa_main(["merge", "a", "b", "--weight", "0.5", "--out", "c"]) == 130
    assert capsys.readouterr().err.strip() == "rsa merge: interrupted"
