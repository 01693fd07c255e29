"""Hub ids, prompt templates and Safe RLHF score models (issue 28), without network.

The tests write a Hugging Face cache themselves, in the cache's own layout (blobs, refs/main,
snapshots/HASH with links into blobs): a tiny SFT model, two score models saved as Safe RLHF
saves them (LlamaForScore: base weights under ``model.``, ``score_head``, the normalizer's
buffers, its config fields), and a PKU-SafeRLHF-like data set (Parquet shards per config and
split, a README whose ``configs:`` section load_dataset honours). `rsa train` and `rsa eval`
then run with hub ids under HF_HUB_OFFLINE=1 in subprocesses (huggingface_hub reads its
settings at import), and the same runs with local paths give the same weights and samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsa.cli import main as rsa_main
from rsa.data import DataError, Pair, encode_pair, record_to_pair
from rsa.templates import SAFE_RLHF, apply_template, check_template
from test_trainer_common import WORDS, pku_records, read_weights

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TEMPLATE_WORDS = ["BEGINNING", "OF", "CONVERSATION", "USER", "ASSISTANT", ":"]
CONFIGS = {"alpaca-7b": "Alpaca-7B", "alpaca2-7b": "Alpaca2-7B"}
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/train.parquet
  - split: test
    path: data/*/test.parquet
""" + "".join(f"""- config_name: {name}
  data_files:
  - split: train
    path: data/{folder}/train.parquet
  - split: test
    path: data/{folder}/test.parquet
""" for name, folder in CONFIGS.items()) + "---\n# PKU-SafeRLHF-like test data\n"


def word_tokenizer():
    """Words and the template's words; punctuation split off, so 'ASSISTANT:cat' is three tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + list(WORDS) + TEMPLATE_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def subword_tokenizer():
    """A sentencepiece-like BPE (Metaspace, no split at punctuation), trained so that tokens merge
    across the template's last colon and the response, as Llama's tokenizer can."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [SAFE_RLHF.format(prompt=" ".join(rng.choice(WORDS) for _ in range(4))) + rng.choice(["Sure", "sorry"])
              + " " + " ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def llama_config(vocab: int, **extra):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0, **extra)
    cfg._attn_implementation = "sdpa"
    return cfg


def save_sft(folder: Path) -> Path:
    from transformers import LlamaForCausalLM
    tok = word_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tok))).float().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_score_model(folder: Path, *, seed: int, score_dim: int = 1, bias: bool = False, score_type: str = "cost",
                     do_normalize: bool = False, head: bool = True, tokenizer=None) -> Path:
    """A score model in Safe RLHF's layout: LlamaForScore's config fields and weight names."""
    from safetensors.torch import save_file
    from transformers import LlamaModel
    tok = tokenizer or word_tokenizer()
    cfg = llama_config(len(tok))
    torch.manual_seed(seed)
    base = LlamaModel(cfg).float()
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    if head:
        tensors["score_head.weight"] = torch.randn(score_dim, cfg.hidden_size)
        if bias:
            tensors["score_head.bias"] = torch.randn(score_dim)
    tensors["normalizer.mean"] = torch.randn(score_dim)
    tensors["normalizer.var"] = torch.rand(score_dim) + 0.5
    tensors["normalizer.count"] = torch.tensor([1000])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config.update(architectures=["LlamaForScore"], score_dim=score_dim, bias=bias, score_type=score_type,
                  do_normalize=do_normalize, normalizer_type="ExponentialMovingAverage", momentum=0.9)
    config.pop("_attn_implementation", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(folder)
    return folder


def parquet_bytes(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def put_in_cache(cache: Path, kind: str, repo: str, files: dict[str, bytes]) -> str:
    """Write a repository snapshot into a hub cache as huggingface_hub lays it out; returns its commit."""
    repo_dir = cache / f"{kind}s--{repo.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                          .encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local folders and files, and the same under hub ids in an HF cache at HF_HOME=tmp/hf."""
    tmp = tmp_path_factory.mktemp("hub")
    local = {"sft": save_sft(tmp / "local" / "sft"),
             "cost": save_score_model(tmp / "local" / "cost", seed=7),
             "reward": save_score_model(tmp / "local" / "reward", seed=8, bias=True, score_type="reward",
                                        do_normalize=True)}
    data = {}
    for i, (name, folder) in enumerate(CONFIGS.items()):
        for j, split in enumerate(("train", "test")):
            rows = pku_records(8 if split == "train" else 3, seed=10 * i + j)
            data[f"data/{folder}/{split}.parquet"] = parquet_bytes(rows)
            (tmp / "local" / name).mkdir(parents=True, exist_ok=True)
            (tmp / "local" / name / f"{split}.parquet").write_bytes(data[f"data/{folder}/{split}.parquet"])
    cache = tmp / "hf" / "hub"
    commits = {"Org/sft": put_in_cache(cache, "model", "Org/sft", folder_files(local["sft"])),
               "Org/beaver-cost": put_in_cache(cache, "model", "Org/beaver-cost", folder_files(local["cost"])),
               "Org/beaver-reward": put_in_cache(cache, "model", "Org/beaver-reward", folder_files(local["reward"])),
               "PKU/SafeRLHF": put_in_cache(cache, "dataset", "PKU/SafeRLHF", {"README.md": README.encode(), **data})}
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    return {"tmp": tmp, "local": local, "commits": commits, "env": env}


def run_rsa(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsa.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def train_config(model, data_path, name=None, split=None, out="runs", template="safe-rlhf", held=None) -> dict:
    """``held``: eval_split (a data set's) or eval_path (a file) of the held-out pairs."""
    def data(pref):
        d = {"path": str(data_path), "preference": pref}
        if held:
            d["eval_split" if name else "eval_path"] = str(held)
        return {**d, "name": name, "split": split} if name else d
    return {"model": str(model), "output_dir": out,
            "defaults": {"objective": "rsa2", "risk": "cvar:0.8", "beta": 0.5, "per_device_train_batch_size": 2,
                         "learning_rate": 0.05, "lr_scheduler_type": "constant", "max_length": 32,
                         "max_prompt_length": 16, "seed": 3, "use_cpu": True, "dataloader_num_workers": 0,
                         "report_to": "none", "prompt_template": template, "max_steps": 2},
            "stages": [{"name": "helpful", "data": data("helpful")},
                       {"name": "safe", "data": data("safe"), "lambda": 2.0}]}


def write_yaml(cfg: dict, path: Path) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------ rsa train with hub ids

@pytest.fixture(scope="module")
def trained(hub):
    tmp = hub["tmp"]
    hub_cfg = write_yaml(train_config("Org/sft", "PKU/SafeRLHF", "alpaca-7b", "train", out="hub_runs",
                                      held="test"), tmp / "hub.yaml")
    done = run_rsa(["train", str(hub_cfg), "--no-progress"], hub["env"], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    local_cfg = write_yaml(train_config(hub["local"]["sft"], tmp / "local" / "alpaca-7b" / "train.parquet",
                                        out="local_runs", held=tmp / "local" / "alpaca-7b" / "test.parquet"),
                           tmp / "local.yaml")
    assert rsa_main(["train", str(local_cfg), "--no-progress"]) == 0
    return tmp / "hub_runs", tmp / "local_runs"


def test_train_with_hub_ids_gives_the_weights_of_the_local_run(trained, hub):
    hub_runs, local_runs = trained
    for stage in ("helpful", "safe"):
        a, b = read_weights(hub_runs / stage), read_weights(local_runs / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft = read_weights(hub["local"]["sft"])
    assert not torch.equal(sft["lm_head.weight"], read_weights(hub_runs / "safe")["lm_head.weight"])
    record = json.loads((hub_runs / "helpful" / "stage.json").read_text())
    assert record["model"] == "Org/sft" and record["model_commit"] == hub["commits"]["Org/sft"]
    assert record["prompt_template"] == SAFE_RLHF
    assert (record["data"]["path"], record["data"]["name"], record["data"]["split"]) == \
        ("PKU/SafeRLHF", "alpaca-7b", "train")
    assert "snapshots" in record["reference"]   # the cache snapshot of Org/sft
    theirs = json.loads((local_runs / "helpful" / "stage.json").read_text())
    assert record["eval_pairs"] == theirs["eval_pairs"] == 3
    assert record["final_metrics"]["eval_loss"] == pytest.approx(theirs["final_metrics"]["eval_loss"], abs=1e-6)


def test_eval_warns_when_a_stage_was_trained_with_another_template(trained, hub, capsys):
    from rsa.eval import EvalSettings
    stage = trained[0] / "helpful"
    common = {"models": {"h": str(stage)}, "prompts": str(hub["tmp"] / "local" / "alpaca-7b" / "test.parquet"),
              "cost": str(hub["local"]["cost"])}
    EvalSettings(**common)
    assert "warning: model h was trained with prompt template" in capsys.readouterr().err
    EvalSettings(**common, prompt_template="safe-rlhf")
    assert capsys.readouterr().err == ""


def test_hub_config_picks_its_config_and_split(hub):
    """load_dataset on the snapshot honours the README's configs: alpaca2-7b's test rows, not alpaca-7b's."""
    code = ("from rsa.data import load_pairs; import json; "
            "print(json.dumps([p.prompt for p in load_pairs('PKU/SafeRLHF', 'safe', name='alpaca2-7b', "
            "split='test')]))")
    done = subprocess.run([sys.executable, "-c", code], env=hub["env"], cwd=hub["tmp"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [r["prompt"] for r in pku_records(3, seed=11)]


# ------------------------------------------------------------------ rsa eval with hub ids

def end_scores_by_hand(folder: Path, texts: list[str]) -> torch.Tensor:
    """Each text alone (+ EOS) through the base in float64, the head at its last token, the normalizer
    if the config asks for it: Safe RLHF's end score, computed from the saved weights."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaModel
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    base = LlamaModel(llama_config(cfg["vocab_size"])).double()
    base.load_state_dict({k[len("model."):]: v.double() for k, v in tensors.items() if k.startswith("model.")})
    tok = AutoTokenizer.from_pretrained(str(folder))
    out = []
    for text in texts:
        ids = torch.tensor([tok(text + tok.eos_token)["input_ids"]])
        h = base(input_ids=ids).last_hidden_state[0, -1]
        s = h @ tensors["score_head.weight"].double().T
        if cfg["bias"]:
            s = s + tensors["score_head.bias"].double()
        if cfg["do_normalize"]:
            std = tensors["normalizer.var"].double().sqrt()
            s = (s - tensors["normalizer.mean"].double()) / (std + 1e-8) if cfg["score_type"] == "reward" \
                else s / (std + 1e-8)
        out.append(s)
    return torch.stack(out)


@pytest.fixture(scope="module")
def evaluated(hub):
    tmp = hub["tmp"]
    args = ["eval", "--model", "Org/sft", "--prompts", "PKU/SafeRLHF", "--prompts-name", "alpaca-7b",
            "--prompts-split", "test", "--prompt-template", "safe-rlhf", "--cost", "Org/beaver-cost",
            "--reward", "Org/beaver-reward", "--samples", "2", "--max-new-tokens", "4", "--batch-size", "3",
            "--out", str(tmp / "eval_hub"), "--no-progress"]
    done = run_rsa(args, hub["env"], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "eval_hub"


def test_eval_with_hub_ids_samples_the_templated_prompt_and_scores_as_safe_rlhf(evaluated, hub):
    records = [json.loads(ln) for ln in (evaluated / "samples.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in pku_records(3, seed=1)]
    assert len(records) == 6
    for rec in records:
        assert rec["prompt"] == SAFE_RLHF.format(prompt=prompts[rec["prompt_index"]])
    texts = [rec["prompt"] + rec["response"] for rec in records]
    for role, folder in (("cost", hub["local"]["cost"]), ("reward", hub["local"]["reward"])):
        want = end_scores_by_hand(folder, texts)[:, 0]
        got = torch.tensor([rec[role] for rec in records], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), role
    report = json.loads((evaluated / "report.json").read_text())
    assert report["settings"]["prompt_template"] == SAFE_RLHF
    assert report["settings"]["sources"] == {k: hub["commits"][k] for k in
                                             ("PKU/SafeRLHF", "Org/sft", "Org/beaver-cost", "Org/beaver-reward")}


def test_eval_template_equals_prompts_written_out(evaluated, hub, tmp_path):
    """Sampling from the templated prompt: the same run on a file whose prompts are the rendered
    strings, without a template and with the local folders, gives the same responses and scores."""
    from test_trainer_common import write_jsonl
    prompts = [{"prompt": SAFE_RLHF.format(prompt=r["prompt"])} for r in pku_records(3, seed=1)]
    path = write_jsonl(prompts, tmp_path / "rendered.jsonl")
    args = ["eval", "--model", f"sft={hub['local']['sft']}", "--prompts", str(path), "--cost",
            str(hub["local"]["cost"]), "--reward", str(hub["local"]["reward"]), "--samples", "2",
            "--max-new-tokens", "4", "--batch-size", "3", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert rsa_main(args) == 0
    mine, theirs = ((json.loads(ln) for ln in (d / "samples.jsonl").read_text().splitlines())
                    for d in (tmp_path / "eval", evaluated))
    for a, b in zip(mine, theirs, strict=True):
        assert (a["prompt"], a["response"]) == (b["prompt"], b["response"])
        assert a["cost"] == pytest.approx(b["cost"], abs=1e-6) and a["reward"] == pytest.approx(b["reward"], abs=1e-6)


# ------------------------------------------------------------------ the score model

@pytest.mark.parametrize("side", ["right", "left"])
def test_score_model_end_score_by_hand_with_padding(tmp_path, side):
    from rsa.eval.scorers import ModelScorer
    folder = save_score_model(tmp_path / "score", seed=3, score_dim=2, bias=True, score_type="cost",
                              do_normalize=True)
    prompts = [SAFE_RLHF.format(prompt=p) for p in ("how do i make a red mat", "tell me", "is the big dog safe")]
    responses = ["sure", "no you can not make a big safe rug please", "the cat sat on the mat"]
    scorer = ModelScorer(f"{folder}#1", "--cost", batch_size=3)
    scorer.tokenizer.padding_side = side
    got = scorer(prompts, responses)
    want = end_scores_by_hand(folder, [p + r for p, r in zip(prompts, responses)])[:, 1]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
    # The text it reads: Safe RLHF's string, template + response + EOS, tokenized once.
    ids = scorer.encode(prompts[0] + responses[0] + scorer.suffix)
    assert ids == scorer.tokenizer(prompts[0] + responses[0] + "</s>")["input_ids"] and ids[-1] == 3


def test_score_model_without_normalizing_gives_the_raw_head(tmp_path):
    from rsa.eval.scorers import ModelScorer
    folder = save_score_model(tmp_path / "score", seed=4)
    texts = ["BEGINNING OF CONVERSATION: USER: help me ASSISTANT:", "a b"]
    got = ModelScorer(str(folder), "--cost")(texts, ["no", "sure"])
    want = end_scores_by_hand(folder, [t + r for t, r in zip(texts, ["no", "sure"])])[:, 0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ templates in training pairs

@pytest.mark.parametrize("make_tokenizer", [word_tokenizer, subword_tokenizer])
def test_template_token_ids_are_safe_rlhfs_string(make_tokenizer):
    tok = make_tokenizer()
    merged = 0
    for rec in pku_records(12, seed=5) + [{**pku_records(1)[0], "response_0": "Sure cat", "response_1": "sorry"}]:
        pair = record_to_pair(rec, "rec", "safe")
        out = encode_pair(tok, pair, max_length=512, max_prompt_length=256, template=SAFE_RLHF)
        prompt_text = SAFE_RLHF.format(prompt=pair.prompt)
        for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            full = tok(prompt_text + response + tok.eos_token, return_offsets_mapping=True)
            assert out[f"{name}_input_ids"] == full["input_ids"] and full["input_ids"][-1] == tok.eos_token_id
            # Masked: exactly the tokens that start inside the templated prompt.
            n_prompt = sum(1 for (a, b) in full["offset_mapping"] if a < len(prompt_text) and (b > a or a == 0))
            labels = out[f"{name}_labels"]
            assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
            merged += tok(prompt_text)["input_ids"] != full["input_ids"][:len(tok(prompt_text)["input_ids"])]
    if make_tokenizer is subword_tokenizer:
        assert merged > 0   # a token spans the template's end and the response: the offsets path ran


def test_check_template():
    assert check_template("safe-rlhf") == SAFE_RLHF == "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    assert apply_template(check_template("Q: {prompt} {{A}}:"), "hi") == "Q: hi {A}:"
    for bad in ("no field", "{prompt} {other}", "{prompt!r}", "{prompt", ""):
        with pytest.raises(ValueError, match="prompt_template"):
            check_template(bad)


def test_template_with_message_prompts_is_refused():
    pair = Pair([{"role": "user", "content": "hi"}], "a", "b", "f.jsonl, line 1")
    with pytest.raises(DataError, match="f.jsonl, line 1: .*message list.*prompt template"):
        encode_pair(word_tokenizer(), pair, 32, 16, template=SAFE_RLHF)


def test_template_differing_from_the_reference_stage_warns(tmp_path, capsys):
    from rsa.stepwise import _check_reference_template
    (tmp_path / "stage.json").write_text(json.dumps({"prompt_template": None}))
    _check_reference_template({"name": "safe"}, tmp_path, SAFE_RLHF)
    assert "warning: stage safe renders prompts with template" in capsys.readouterr().err
    _check_reference_template({"name": "safe"}, tmp_path, None)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ bad input: one line, exit 2

def one_line(capsys, argv) -> str:
    assert rsa_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_one_line_each(hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["tmp"] / "hf" / "hub"))
    local = hub["local"]
    cfg = train_config("Org/not-cached", hub["tmp"] / "local" / "alpaca-7b" / "train.parquet")
    line = one_line(capsys, ["train", str(write_yaml(cfg, tmp_path / "a.yaml"))])
    assert line.startswith("rsa train: error: model: 'Org/not-cached' is not a local path") and \
        "HF_HUB_OFFLINE=1" in line
    cfg = train_config(local["sft"], "PKU/not-cached", "alpaca-7b", "train")
    line = one_line(capsys, ["train", str(write_yaml(cfg, tmp_path / "b.yaml"))])
    assert line.startswith("rsa train: error: data: 'PKU/not-cached' is not a local path and the data set")
    cfg = train_config(local["sft"], hub["tmp"] / "local" / "alpaca-7b" / "train.parquet", template="no field")
    line = one_line(capsys, ["train", str(write_yaml(cfg, tmp_path / "c.yaml"))])
    assert line.startswith("rsa train: error:") and "has no {prompt} field" in line
    prompts = hub["tmp"] / "local" / "alpaca-7b" / "test.parquet"
    base = ["eval", "--model", str(local["sft"]), "--prompts", str(prompts), "--out", str(tmp_path / "e")]
    line = one_line(capsys, base + ["--cost", "Org/not-cached#0"])
    assert line.startswith("rsa eval: error: --cost scorer 'Org/not-cached#0': 'Org/not-cached' is not a local path")
    line = one_line(capsys, base + ["--cost", str(local["cost"]), "--prompt-template", "ASSISTANT:"])
    assert line.startswith("rsa eval: error: --prompt-template: 'ASSISTANT:' has no {prompt} field")
    headless = save_score_model(tmp_path / "headless", seed=1, head=False)
    line = one_line(capsys, base + ["--cost", str(headless)])
    assert line.startswith("rsa eval: error: --cost scorer") and "hold no score_head.weight" in line


def test_7b_examples_read_the_hub_with_the_template():
    from rsa.config import load_config
    for name in ("pku_saferlhf_7b.yaml", "pku_saferlhf_7b_lora.yaml", "sacpo_pku_7b.yaml"):
        cfg = load_config(ROOT / "examples" / name)
        assert cfg["model"] == "PKU-Alignment/alpaca-7b-reproduced"
        assert cfg["defaults"]["prompt_template"] == "safe-rlhf"
        for st in cfg["stages"]:
            d = st["data"]
            assert (d["path"], d["name"], d["split"], d["eval_split"]) == \
                ("PKU-Alignment/PKU-SafeRLHF", "alpaca-7b", "train", "test")
    sacpo = load_config(ROOT / "examples" / "sacpo_pku_7b.yaml")
    assert {st["overrides"].get("objective", sacpo["defaults"]["objective"]) for st in sacpo["stages"]} == {"dpo"}
    assert [sacpo["defaults"]["beta"] / (st["lambda"] or 1) for st in sacpo["stages"]] == \
        pytest.approx([0.1, 0.1, 0.05, 0.025, 0.01])
    assert sacpo["defaults"]["learning_rate"] == 2e-5


def test_pinned_revisions_resolve_from_the_cache(hub, monkeypatch):
    from huggingface_hub import constants

    from rsa.hub import HubError, dataset_folder, model_folder, parse_hub_id
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["tmp"] / "hf" / "hub"))
    commit = hub["commits"]["Org/sft"]
    assert parse_hub_id(f"Org/sft@{commit}") == ("Org/sft", commit)
    assert parse_hub_id("data/train.jsonl") is None and parse_hub_id("./Org/sft") is None
    folder = model_folder(f"Org/sft@{commit}", "model")
    assert folder.name == commit and (folder / "model.safetensors").is_file()
    assert model_folder("Org/sft@main", "model") == folder
    data = hub["commits"]["PKU/SafeRLHF"]
    assert dataset_folder("PKU/SafeRLHF", "data", revision=data).name == data
    with pytest.raises(HubError, match="model: 'Org/sft@v9' is not a local path"):
        model_folder("Org/sft@v9", "model")
    with pytest.raises(HubError, match="revision given twice"):
        dataset_folder("PKU/SafeRLHF@main", "data", revision="v1")


def test_merge_takes_hub_ids(hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["tmp"] / "hf" / "hub"))
    sft = hub["local"]["sft"]
    assert rsa_main(["merge", "Org/sft", str(sft), "--weight", "0.5", "--out", str(tmp_path / "m")]) == 0
    merged, original = read_weights(tmp_path / "m"), read_weights(sft)
    assert all(torch.equal(merged[k], original[k]) for k in original)   # A with itself: A, bit for bit
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert (record["a"], record["a_commit"], record["b"]) == ("Org/sft", hub["commits"]["Org/sft"], str(sft))
    capsys.readouterr()
    line = one_line(capsys, ["merge", str(sft), "Org/not-cached", "--weight", "0.5", "--out", str(tmp_path / "n")])
    assert line.startswith("rsa merge: error: b: 'Org/not-cached' is not a local path")
