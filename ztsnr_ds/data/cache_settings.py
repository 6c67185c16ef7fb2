"""The data.* settings a latent cache was built with, and the check that training uses the same.

The merge writes ``settings.json`` into the cache folder last; training (config.check_drift, before any
model loads) compares its data.* with it and stops naming the keys that differ and the cache.py command:
a cache built with other buckets, crop, source or tag weights would otherwise be used as it is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from ztsnr_ds.data.cache_files import write_atomic
from ztsnr_ds.machine import is_main_process

CACHE_SETTINGS = "settings.json"
"""In the cache folder: the data.* settings of the build that wrote it."""
NOT_CACHE_SETTINGS = ("cache_dir", "shard_max_mb")  # where the cache lies, how its files are cut


def cache_settings(data) -> dict:
    """The data.* settings a cache depends on (a CacheConfig), JSON-able. The sources as [name, absolute
    path, template] each (data.source is the source named ""): their repeats and caption edits act per
    use, not on the cache, so changing them needs no rebuild."""
    skip = (*NOT_CACHE_SETTINGS, "source", "sources")
    settings = {k: v for k, v in asdict(data).items() if k not in skip}
    settings["sources"] = [[s.name, str(Path(s.path).resolve()), s.template] for s in data.source_list()]
    return json.loads(json.dumps(settings))


def write_cache_settings(data) -> None:
    """Record, in the cache folder, the settings of the build that just wrote it."""
    write_atomic(Path(data.cache_dir) / CACHE_SETTINGS, json.dumps(cache_settings(data), indent=1).encode())


def check_cache(data, config_path: str = "<your yaml>") -> None:
    """Stop if data.* differ from what the cache at data.cache_dir was built with."""
    path = Path(data.cache_dir) / CACHE_SETTINGS
    if not path.is_file():
        note(f"note: {data.cache_dir} records no build settings (built before they were recorded): a change "
            f"of data.* since its build goes unnoticed; `python launch/cache.py --config {config_path}` "
            "records them")
        return
    built = flatten(json.loads(path.read_text()), "data.")
    # a key only one side has was added or removed in ztsnr_ds since that build: not a change of the user's
    now = flatten(cache_settings(data), "data.")
    changed = {k: v for k, v in changed_keys(built, now).items() if k in built and k in now}
    if changed:
        raise ValueError(f"data.cache_dir {data.cache_dir} was built with other settings: "
                         f"{describe(changed)}. Rebuild it (`python launch/cache.py --config {config_path}`: "
                         "only the images the change affects are encoded again), or set these keys back")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"<prefix>a.b": 1}."""
    out = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def changed_keys(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for the flat keys that differ (a key missing on one side reads as None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def describe(changed: dict[str, tuple]) -> str:
    """"key old -> new, ..." for a message."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def note(message: str) -> None:
    """A warning on stderr, from rank 0 only (64 ranks would print it 64 times)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
