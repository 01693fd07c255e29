"""`rsa eval` end to end: sample every model on the prompts, score, write samples, report, plots."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rsa.data import DataError
from rsa.errors import UserError

from . import samples_file
from .loading import load_causal_lm, load_tokenizer
from .prompts import load_prompts, render
from .report import build_report
from .sampling import SamplingError, per_row_draw, row_seed, sample
from .scorers import load_scorer
from .settings import EvalSettings


def plan(settings: EvalSettings, n_prompts: int) -> list[list[samples_file.Key]]:
    """Batches of (model, prompt_index, sample_index): model by model, prompt-major, batch_size rows each."""
    rows = [(p, s) for p in range(n_prompts) for s in range(settings.samples)]
    return [[(name, p, s) for p, s in rows[i:i + settings.batch_size]]
            for name in settings.models for i in range(0, len(rows), settings.batch_size)]


def check_run_folder(out: Path, settings: EvalSettings) -> None:
    """Write OUT/settings.json, or check that the run being continued had the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "settings.json"
    identity = settings.identity()
    samples = out / "samples.jsonl"
    if path.exists() and samples.exists() and samples.stat().st_size > 0:   # nothing sampled: nothing to protect
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            raise UserError(f"--out {str(out)!r} holds a run with other settings ({', '.join(changed)} differ); "
                            "pass the same arguments to continue it, or another --out")
    path.write_text(json.dumps(identity, indent=1) + "\n")


def run_eval(settings: EvalSettings, out, progress: bool = True) -> dict:
    out = Path(out)
    if not progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # "Loading weights" bars
    prompts = load_prompts(settings.prompts, settings.prompts_name, settings.prompts_split, settings.prompts_column,
                           settings.prompt_template)
    check_run_folder(out, settings)
    batches = plan(settings, len(prompts))
    path = out / "samples.jsonl"
    done = samples_file.resume(path, batches)
    if done and progress:
        print(f"rsa eval: continuing {path}: {done} of {len(batches)} batches already there")
    if done < len(batches):
        _sample_and_score(settings, prompts, batches, done, path, progress)
    return build_report(settings, samples_file.read(path), len(prompts), out)


def _sample_and_score(settings, prompts, batches, done, path, progress):
    device = settings.device
    dtype = settings.dtype
    cost = load_scorer(settings.cost, "--cost", device, settings.batch_size, dtype)
    reward = load_scorer(settings.reward, "--reward", device, settings.batch_size, dtype) if settings.reward else None
    reference = load_causal_lm(settings.reference, "--reference", device, dtype) if settings.reference else None
    per_model = len(batches) // len(settings.models)
    for m, (name, folder) in enumerate(settings.models.items()):
        todo = range(max(done - m * per_model, 0), per_model)
        if not len(todo):
            continue
        model = load_causal_lm(folder, f"--model {name}", device, dtype)
        tok = load_tokenizer(folder, f"--model {name}")
        if reference is not None:
            vocab, ref_vocab = (x.get_output_embeddings().weight.shape[0] for x in (model, reference))
            if vocab != ref_vocab:
                raise UserError(f"--reference: its vocabulary ({ref_vocab}) differs from model {name}'s ({vocab})")
        rendered = [render(tok, p, settings.prompt_template) for p in prompts]
        for prompt, (_, ids) in zip(prompts, rendered):
            if not ids:
                raise DataError(f"{prompt.where}: field 'prompt' gives no tokens for model {name}")
        eos_ids = _eos_ids(model, tok)
        mine = batches[m * per_model:(m + 1) * per_model]
        bar = tqdm(total=sum(map(len, mine)), initial=sum(map(len, mine[:todo.start])), desc=f"eval {name}",
                   unit="response", disable=not progress)
        for b in todo:
            keys = mine[b]
            bar.set_postfix_str("generating" + (" and KL" if reference is not None else ""))
            ids, mask = _left_pad([rendered[p][1] for _, p, _ in keys], tok.pad_token_id, device)
            draw = per_row_draw([row_seed(settings.seed, p, s) for _, p, s in keys])
            try:
                out = sample(model, ids, draw, max_new_tokens=settings.max_new_tokens, eos_ids=eos_ids,
                             pad_id=tok.pad_token_id, attention_mask=mask, temperature=settings.temperature,
                             top_p=settings.top_p, reference=reference)
            except SamplingError as err:
                raise _sampling_error(err, name, keys, prompts) from None
            seq, gen = out.seq, out.generated
            responses = [_decode(tok, row, live, eos_ids) for row, live in
                         zip(seq[:, ids.shape[1]:].tolist(), gen.tolist())]
            texts = [rendered[p][0] for _, p, _ in keys]
            records = [{"model": name, "prompt_index": p, "sample_index": s, "prompt": t, "response": r}
                       for (_, p, s), t, r in zip(keys, texts, responses)]
            bar.set_postfix_str("scoring")
            if reward is not None:
                for rec, v in zip(records, reward(texts, responses)):
                    rec["reward"] = float(v)
            for rec, v in zip(records, cost(texts, responses)):
                rec["cost"] = float(v)
            if out.kl is not None:
                for rec, v in zip(records, out.kl.tolist()):
                    rec["kl"] = v
            samples_file.append(path, records)
            bar.update(len(keys))
        bar.close()
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _sampling_error(err: SamplingError, name: str, keys, prompts) -> UserError:
    """The error naming the model (or the reference) and the first prompt whose sampling broke."""
    p = keys[err.rows[0]][1]
    text = prompts[p].value if isinstance(prompts[p].value, str) else prompts[p].value[-1]["content"]
    what = f"--model {name}" if err.source == "model" else f"--reference (KL of model {name})"
    more = f" and {len(err.rows) - 1} other response(s) of the batch" if len(err.rows) > 1 else ""
    return UserError(f"{what}: the next-token distribution is not finite (NaN or inf logits) at response step "
                     f"{err.step} for prompt {p} ({prompts[p].where}: {text[:60]!r}){more}; the weights may hold "
                     "NaN, or the dtype overflows (try --dtype bfloat16 or float32)")


def _eos_ids(model, tok) -> list[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise UserError(f"--model: {model.name_or_path!r} defines no end-of-sequence token (generation_config or "
                        "tokenizer), so a response could not end")
    return sorted(int(i) for i in ids)


def _left_pad(rows: list[list[int]], pad_id: int, device: str):
    """(ids, mask or None): prompts right-aligned so that every response starts in one column."""
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return torch.tensor(rows, device=device), None
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _decode(tok, row: list[int], live: list[bool], eos_ids: list[int]) -> str:
    """The response text: generated tokens before the first EOS, special tokens dropped."""
    ids = []
    for t, alive in zip(row, live):
        if not alive or t in eos_ids:
            break
        ids.append(t)
    return tok.decode(ids, skip_special_tokens=True)
