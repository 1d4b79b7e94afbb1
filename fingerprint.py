"""Which weights a run used, so a resume can tell when a model changed under the same name.

A run records in args.json, under "weights", one fingerprint per model: a hub model by its revision (the commit of
the snapshot in the Hugging Face cache, which is what loads), a local directory by the sha256 of its weight files and
config, a random: model by its name (built from the name alone, with a fixed seed). The sha256 of a large file takes a
while (about a minute for 15 GB), so it is cached under ~/.cache/tcod/hashes.json by path, size and modification
time: a resume reads only files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os

import models

WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pth", ".distcp")  # .distcp: a --fsdp checkpoint's shards
NOT_WEIGHTS = ("trainer.pt", "training_args.bin")  # a tcod checkpoint's optimizer state is not the model


def _cache_path() -> str:
    return models.cache_dir("hashes.json")


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    try:
        with open(_cache_path()) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        cache[key] = h.hexdigest()
        try:  # a cache that cannot be written only costs time
            os.makedirs(os.path.dirname(_cache_path()), exist_ok=True)
            with open(_cache_path() + f".{os.getpid()}", "w") as f:
                json.dump(cache, f)
            os.replace(_cache_path() + f".{os.getpid()}", _cache_path())
        except OSError:
            pass
    return cache[key]


def hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot that from_pretrained loads, or None when the model is not cached."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "config.json", cache_dir=models.hub_cache())
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def weights_id(name: str) -> str | None:
    """The model's fingerprint; None for a hub model not downloaded yet (known once it has loaded)."""
    if name.startswith("random:"):
        return name
    path = models.resolve_model(name)
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if (n.endswith(WEIGHT_FILES) or n in ("config.json", "adapter_config.json"))
                       and n not in NOT_WEIGHTS)
        h = hashlib.sha256()
        for n in files:
            h.update(f"{n}\0{file_sha256(os.path.join(path, n))}\n".encode())
        return f"sha256:{h.hexdigest()}"
    revision = hub_revision(path)
    return f"{path}@{revision}" if revision else None


def changed(recorded: dict | None, now: dict, roles: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(models whose weights differ from the run's record, models the record cannot vouch for)."""
    if recorded is None:
        return [], list(roles)
    differ = [r for r in roles if recorded.get(r) and now.get(r) and recorded[r] != now[r]]
    unknown = [r for r in roles if not (recorded.get(r) and now.get(r))]
    return differ, unknown
