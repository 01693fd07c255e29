"""Shared pieces of the trainer tests: a tiny Llama-style model and a word-level tokenizer,
built from a config and saved locally (no hub), and small preference data files.

Imported by the other test_trainer*.py files; its own tests check the pieces themselves.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

WORDS = ("the cat dog sat ran on a mat rug red blue big small is was and not help me how do i "
         "make safe harm please tell you can yes no sure sorry").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["user", "assistant", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def build_model(vocab_size: int, seed: int = 0, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float()


def save_tiny_model(folder, seed: int = 0, hidden: int = 16) -> Path:
    """A tiny SFT model folder (safetensors + tokenizer)."""
    folder = Path(folder)
    tok = build_tokenizer()
    model = build_model(len(tok), seed, hidden)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def plain_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, rng.randint(2, 6)), "chosen": sentence(rng, rng.randint(1, 5)),
             "rejected": sentence(rng, rng.randint(1, 5))} for _ in range(n)]


def pku_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s0, s1 = rng.random() < 0.5, rng.random() < 0.5
        out.append({"prompt": sentence(rng, rng.randint(2, 6)), "response_0": sentence(rng, rng.randint(1, 5)),
                    "response_1": sentence(rng, rng.randint(1, 5)), "better_response_id": rng.randint(0, 1),
                    "safer_response_id": 0 if s0 and not s1 else rng.randint(0, 1),
                    "is_response_0_safe": s0, "is_response_1_safe": s1})
    return out


def write_jsonl(records, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from rsa.stepwise import run_stages

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith("safe") and state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    run_stages(sys.argv[1], progress=False, callbacks=[KillAtStep()])
""")


def sigkill_at_safe_step_3(config: Path, cwd: Path):
    """Run a config's stages in a process that SIGKILLs itself after step 3 of the stage 'safe'."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(config)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]


def logged_steps(stage_dir) -> list[int]:
    """The steps of a stage's training lines in metrics.jsonl."""
    lines = [json.loads(ln) for ln in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return [ln["step"] for ln in lines if "loss" in ln]


def test_tiny_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer
    save_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    ids = tok("the cat sat")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 4 and tok.unk_token_id not in ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("assistant : ")
