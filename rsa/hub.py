"""Hugging Face hub ids wherever a model or a data set goes, resolved through the local cache.

A value names a local path when that path exists, starts with ``.``, ``/`` or ``~``, or ends
like a data file (``.jsonl``, ``.parquet``, ...); otherwise ``ORG/NAME`` (optionally
``ORG/NAME@REVISION``: a branch, a tag or a commit) names a hub repository. Models are
fetched with ``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``) and then loaded from that snapshot folder with ``from_pretrained``, so
every local check (safetensors only, no remote code, LoRA stage folders) applies unchanged;
only config, tokenizer and safetensors files are fetched, never pickled weights.
``HF_HUB_OFFLINE=1`` is honoured: the snapshot is then taken from the cache or refused.

Data sets go the same way (``repo_type="dataset"``) and are read with
``datasets.load_dataset(SNAPSHOT_FOLDER, name=CONFIG, split=SPLIT)``: `datasets`' own
offline mode does not read a raw hub snapshot, while ``snapshot_download`` resolves one
from the cache and ``load_dataset`` on the folder honours the ``configs:`` of its README.
Only the README and the files of the requested config are fetched when the README lists them.

`huggingface_hub` and `datasets` are imported inside the functions: `rsa --help` and
local-only runs never import them.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

# ORG/NAME[@REVISION]; a revision may hold slashes (refs/pr/1).
HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?$")
# A value ending like a data file is a path, never a hub id (data/train.jsonl before it is written).
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".safetensors")
# What a model folder needs: config, tokenizer, safetensors weights, PEFT adapters. Never *.bin / *.pt.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(UserError):
    """A hub id that is neither a local path nor reachable (or not in the cache offline)."""


def parse_hub_id(value) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if ``value`` is not an existing local path and reads as
    ORG/NAME[@REVISION]; None otherwise (a local path, existing or not)."""
    text = str(value)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.lower().endswith(FILE_SUFFIXES):
        return None
    m = HUB_ID_RE.match(text)
    return (m["repo"], m["revision"]) if m else None


def is_hub_id(value) -> bool:
    return parse_hub_id(value) is not None


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def snapshot(repo: str, revision: str | None, what: str, repo_type: str = "model", allow_patterns=None) -> Path:
    """The local snapshot folder of a hub repository (downloaded into the cache if needed)."""
    from huggingface_hub import snapshot_download

    kind = "data set" if repo_type == "dataset" else "model"
    at = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns))
    except Exception as err:   # noqa: BLE001 - every failure of the look-up is the same user-facing fact
        if offline():
            why = "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
        else:
            why = " ".join(str(err).split())[:300] or type(err).__name__
        raise HubError(f"{what}: {at!r} is not a local path and the {kind} could not be loaded from the "
                       f"Hugging Face hub ({why})") from err


def commit_of(folder: Path) -> str | None:
    """The commit hash of a cache snapshot folder (…/snapshots/HASH), else None."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def model_folder(value, what: str) -> Path:
    """A local model folder for ``value``: the path itself, or the cache snapshot of a hub id.
    A path that does not exist is returned as is (the caller names it in its own error)."""
    hub = parse_hub_id(value)
    if hub is None:
        return Path(value).expanduser()
    return snapshot(hub[0], hub[1], what, "model", MODEL_FILES)


def resolve_scorer_spec(spec: str, role: str) -> str:
    """A --cost/--reward value with a hub id (ORG/NAME[@REV][#INDEX]) replaced by its cache
    snapshot folder (#INDEX kept); any other value unchanged."""
    folder, sep, index = spec.rpartition("#") if "#" in spec else (spec, "", "")
    if is_hub_id(folder):
        return str(model_folder(folder, f"{role} scorer {spec!r}")) + sep + index
    return spec


def dataset_folder(value, what: str, name: str | None = None, revision: str | None = None) -> Path:
    """The snapshot folder of a hub data set (only the README and, where it lists them, the
    files of config ``name`` are fetched)."""
    hub = parse_hub_id(value)
    if hub is None:
        raise HubError(f"{what}: {str(value)!r} is neither a local path nor a hub id (ORG/NAME)")
    repo, rev = hub
    if revision is not None and rev is not None and revision != rev:
        raise HubError(f"{what}: revision given twice ({rev!r} after '@' and revision: {revision!r})")
    rev = revision or rev
    patterns = None
    if not offline():
        readme = snapshot(repo, rev, what, "dataset", ["README.md"]) / "README.md"
        patterns = _config_files(readme, name)
    return snapshot(repo, rev, what, "dataset", patterns)


def _config_files(readme: Path, name: str | None) -> list[str] | None:
    """The README plus the data file patterns of config ``name`` ("default" when None), or None
    (fetch everything) when the README lists no such config."""
    import yaml

    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    wanted = name or "default"
    for cfg in configs or []:
        if isinstance(cfg, dict) and cfg.get("config_name") == wanted:
            files = cfg.get("data_files")
            entries = files if isinstance(files, list) else [files]
            patterns = []
            for e in entries:
                paths = e.get("path") if isinstance(e, dict) else e
                patterns += paths if isinstance(paths, list) else [paths]
            if all(isinstance(p, str) for p in patterns):
                return ["README.md", *patterns]
    return None


def load_dataset_records(path, what: str, name: str | None = None, split: str | None = None,
                         revision: str | None = None) -> list[tuple[str, dict]]:
    """[(where, record)] of one split of a data set: a hub id or a local folder (a clone of a hub
    data set repository), read with datasets.load_dataset; DataError-style messages name it."""
    import datasets

    local = Path(str(path)).expanduser()
    folder = local if local.is_dir() else dataset_folder(path, what, name, revision)
    label = f"{path}" + (f" ({name})" if name else "") + f" split {split or 'train'}"
    try:
        ds = datasets.load_dataset(str(folder), name=name, split=split or "train")
    except (ValueError, KeyError, OSError, datasets.exceptions.DatasetsError) as err:
        raise HubError(f"{what}: cannot read {label}: {' '.join(str(err).split())[:300]}") from err
    return [(f"{label}, row {i + 1}", rec) for i, rec in enumerate(ds)]
