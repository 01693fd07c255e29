"""rsa.data and rsa.config: record schemas, named errors for malformed data, truncation, masking."""
from __future__ import annotations

import json

import pytest

from rsa.config import load_config
from rsa.data import (IGNORE_INDEX, DataError, PairCollator, encode_pair, load_pairs, read_records,
                      record_to_pair, split_pairs)
from test_trainer_common import build_tokenizer, pku_records, plain_records, write_jsonl

PKU = {"prompt": "how do i make a cat", "response_0": "sorry no", "response_1": "sure the cat",
       "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False}


def test_pku_schema_gives_helpful_and_safe_pairs():
    helpful = record_to_pair(PKU, "f, line 1", "helpful")
    safe = record_to_pair(PKU, "f, line 1", "safe")
    assert (helpful.chosen, helpful.rejected) == ("sure the cat", "sorry no")
    assert (safe.chosen, safe.rejected) == ("sorry no", "sure the cat")


@pytest.mark.parametrize("record,preference,field", [
    ({"prompt": "a", "chosen": "b"}, None, "rejected"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, None, "chosen"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, None, "chosen"),
    ({"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}, None, "prompt"),
    ({**PKU, "better_response_id": 2}, "helpful", "better_response_id"),
    ({**PKU, "safer_response_id": True}, "safe", "safer_response_id"),
    ({k: v for k, v in PKU.items() if k != "safer_response_id"}, "safe", "safer_response_id"),
    ({**PKU, "is_response_1_safe": "no"}, "safe", "is_response_1_safe"),
    ({**PKU, "response_0": None}, "helpful", "response_0"),
])
def test_malformed_record_error_names_file_line_and_field(tmp_path, record, preference, field):
    path = write_jsonl(plain_records(2) + [record] if preference is None else pku_records(2) + [record],
                       tmp_path / "d.jsonl")
    with pytest.raises(DataError) as err:
        load_pairs(path, preference)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and repr(field) in msg, msg


def test_invalid_json_and_file_types(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(plain_records(1)[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: invalid JSON"):
        read_records(bad)
    with pytest.raises(DataError, match="unsupported data file type"):
        read_records(write_jsonl([], tmp_path / "d.csv"))
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "missing.jsonl")
    arr = tmp_path / "d.json"
    arr.write_text("[\n" + json.dumps(plain_records(1)[0]) + ",\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n]")
    with pytest.raises(DataError, match=r"d.json, line 3: missing field 'rejected'"):
        load_pairs(arr)


def test_json_and_parquet_files_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    recs = pku_records(5)
    (tmp_path / "d.json").write_text(json.dumps(recs, indent=1))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    want = load_pairs(write_jsonl(recs, tmp_path / "d.jsonl"), "safe")
    for name in ("d.json", "d.parquet"):
        got = load_pairs(tmp_path / name, "safe")
        assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(p.prompt, p.chosen, p.rejected) for p in want]
    bad = [dict(r) for r in recs]
    bad[3]["better_response_id"] = 7
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 4: field 'better_response_id'"):
        load_pairs(tmp_path / "bad.parquet", "helpful")


def test_prompt_masked_and_truncation_keeps_prompt_end_and_response_start():
    tok = build_tokenizer()
    pair = record_to_pair({"prompt": "the cat sat on a mat", "chosen": "yes the dog ran", "rejected": "no"}, "f", None)
    enc = encode_pair(tok, pair, max_length=7, max_prompt_length=4)
    ids = tok("the cat sat on a mat")["input_ids"]
    assert enc["chosen_input_ids"][:4] == ids[-4:]  # the end of the prompt (its BOS is cut)
    resp = tok("yes the dog ran", add_special_tokens=False)["input_ids"]
    assert enc["chosen_input_ids"][4:] == resp[:3]  # the start of the response
    assert enc["chosen_labels"] == [IGNORE_INDEX] * 4 + resp[:3]
    no = tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["rejected_input_ids"] == ids[-4:] + no and enc["rejected_labels"] == [IGNORE_INDEX] * 4 + no
    full = encode_pair(tok, pair, max_length=20, max_prompt_length=10)
    assert full["chosen_input_ids"] == ids + resp + [tok.eos_token_id]


def test_chat_messages_rendered_with_the_template():
    tok = build_tokenizer()
    rec = {"prompt": [{"role": "user", "content": "help me"}], "chosen": "sure",
           "rejected": [{"role": "assistant", "content": "no"}]}
    enc = encode_pair(tok, record_to_pair(rec, "f", None), max_length=30, max_prompt_length=20)
    text = tok.decode(enc["chosen_input_ids"])
    assert text.split() == "user : help me </s> assistant : sure </s>".split()
    prompt_len = len(tok("user : help me </s> assistant :", add_special_tokens=False)["input_ids"])
    assert enc["chosen_labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tok.decode([t for t in enc["rejected_labels"] if t != IGNORE_INDEX]).split() == ["no", "</s>"]
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_pair(tok, record_to_pair(rec, "f, line 9", None), 30, 20)


def test_collator_padded_and_packed_layouts():
    tok = build_tokenizer()
    feats = [encode_pair(tok, record_to_pair(r, "f", None), 16, 8) for r in plain_records(2)]
    padded = PairCollator(tok.pad_token_id)(feats)
    packed = PairCollator(tok.pad_token_id, padding_free=True)(feats)
    lengths = [len(f["chosen_input_ids"]) for f in feats] + [len(f["rejected_input_ids"]) for f in feats]
    assert padded["input_ids"].shape == (4, max(lengths))
    assert padded["attention_mask"].sum(1).tolist() == lengths
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["sequence_ids"].bincount().tolist() == lengths
    assert (packed["position_ids"][0] == 0).sum() == 4
    assert packed["labels"].tolist() == [t for row, n in zip(padded["labels"].tolist(), lengths) for t in row[:n]]


def test_split_is_seeded_and_disjoint():
    pairs = [record_to_pair(r, "f", None) for r in plain_records(10)]
    train, held = split_pairs(pairs, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8 and not {id(p) for p in train} & {id(p) for p in held}
    assert [p.prompt for p in split_pairs(pairs, 0.2, seed=1)[1]] == [p.prompt for p in held]


def test_config_validation(tmp_path):
    base = {"model": "m", "output_dir": "o", "stages": [{"name": "s", "data": "d.jsonl"}]}
    cfg = load_config(base)
    assert cfg["stages"][0]["data"]["path"].endswith("d.jsonl") and load_config(cfg) == cfg
    bad = [({**base, "extra": 1}, "unknown key"),
           ({**base, "defaults": {"learning_rat": 1}}, "learning_rat"),
           ({**base, "defaults": {"risk": "cvar:2"}}, "ALPHA|alpha|cvar"),
           ({**base, "defaults": {"output_dir": "x"}}, "output_dir"),
           ({**base, "stages": [{"name": "s", "data": "d.jsonl", "lambda": -1}]}, "lambda"),
           ({**base, "stages": [{"name": "s", "data": "d.jsonl"}] * 2}, "used twice"),
           ({**base, "stages": [{"name": "a/b", "data": "d.jsonl"}]}, "name"),
           ({**base, "stages": [{"name": "s", "data": {"path": "d", "preference": "fun"}}]}, "preference"),
           ({**base, "stages": [{"name": "s", "data": "d", "objective": "ppo"}]}, "objective")]
    for raw, match in bad:
        with pytest.raises(ValueError, match=match):
            load_config(raw)
    y = tmp_path / "c.yaml"
    y.write_text("model: sft\noutput_dir: out\nstages:\n  - {name: s, data: d.jsonl, lambda: 2}\n")
    cfg = load_config(y)
    assert cfg["model"] == str(tmp_path / "sft") and cfg["stages"][0]["lambda"] == 2


def test_malformed_later_stage_stops_before_any_training(tmp_path):
    from rsa.stepwise import run_stages
    from test_trainer_common import save_tiny_model
    save_tiny_model(tmp_path / "sft")
    write_jsonl(plain_records(4), tmp_path / "ok.jsonl")
    write_jsonl(pku_records(3) + [{**PKU, "safer_response_id": "0"}], tmp_path / "pku.jsonl")
    cfg = {"model": str(tmp_path / "sft"), "output_dir": str(tmp_path / "out"),
           "defaults": {"use_cpu": True, "max_steps": 1},
           "stages": [{"name": "a", "data": str(tmp_path / "ok.jsonl")},
                      {"name": "b", "data": {"path": str(tmp_path / "pku.jsonl"), "preference": "safe"}}]}
    with pytest.raises(DataError, match=r"pku.jsonl, line 4: field 'safer_response_id'"):
        run_stages(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_data_mapping_split_name_or_fraction(tmp_path):
    """split: a number holds out a fraction of a file; a name applies to a data set only."""
    path = write_jsonl(pku_records(4), tmp_path / "pku.jsonl")
    (tmp_path / "sft").mkdir()

    def cfg(**data):
        return {"model": str(tmp_path / "sft"), "output_dir": str(tmp_path / "out"),
                "stages": [{"name": "s", "data": {"path": str(path), "preference": "safe", **data}}]}
    d = load_config(cfg(split=0.25))["stages"][0]["data"]
    assert (d["split"], d["holdout"]) == (None, 0.25)
    assert load_config(load_config(cfg(split=0.25)))["stages"][0]["data"] == d   # validated twice: unchanged
    hub = load_config({**cfg(), "stages": [{"name": "s", "data": {"path": "Org/Data", "name": "alpaca-7b",
                                                                   "split": "train[:90%]", "eval_split": "test"}}]})
    d = hub["stages"][0]["data"]
    assert (d["path"], d["name"], d["split"], d["eval_split"], d["holdout"]) == \
        ("Org/Data", "alpaca-7b", "train[:90%]", "test", None)
    for bad, match in (({"split": "train"}, "is a local file"), ({"name": "x"}, "is a local file"),
                       ({"split": 1.5}, "held-out fraction"), ({"revision": ""}, "data.revision")):
        with pytest.raises(ValueError, match=match):
            load_config(cfg(**bad))
    with pytest.raises(DataError, match="is a local file; name, split and revision"):
        load_pairs(path, "safe", split="train")
    with pytest.raises(ValueError, match="prompt_template: 'x' has no {prompt} field"):
        load_config({**cfg(), "defaults": {"prompt_template": "x"}})
