"""Config drift on resume, never silent (the cache against data.* is data/cache_settings.py).

Run by config.parse before any model loads (a ValueError becomes exit 2): a resume compares the
checkpoint's config with the new one. Recipe keys (RECIPE_KEYS: the noise schedule, the loss, the
buckets) change what the model learns: a change exits 2 naming them unless ``trainer.allow_recipe_change``;
any other change (lr, logging, validation, ema) is a warning listing old -> new. Every change is appended
to the config's ``history``, which the next checkpoint stores. A DeepSpeed JSON of another precision than
the checkpoint's exits 2 too (DeepSpeed would fail on a missing file).
"""

from __future__ import annotations

import json
from pathlib import Path

from ztsnr_ds.data.cache_settings import changed_keys, describe, flatten, note

RECIPE_KEYS = ("noise.", "loss.", "data.buckets.")
"""Prefixes of the keys whose change on resume changes what is learned (exit 2 without the override)."""
RUN_KEYS = ("trainer.resume", "trainer.overwrite", "trainer.allow_recipe_change", "history")
"""Keys that say how this start goes, not what the run is: never compared."""
HISTORY = "history"


def check_resume(saved: dict, new: dict, step: int, allow_recipe_change: bool) -> dict:
    """Compare a checkpoint's config with this run's; returns ``new`` with the changes in its history.

    Raises ValueError for a changed recipe key unless ``allow_recipe_change``; warns for the others.
    """
    old, now = flatten(saved), flatten(json.loads(json.dumps(new)))  # json: tuples read back as lists
    changed = {k: v for k, v in changed_keys(old, now).items() if not k.startswith(RUN_KEYS)}
    history = list(saved.get(HISTORY, []))
    if changed:
        # a key only one side has was added or removed in ztsnr_ds since: not a recipe change (a warning)
        recipe = {k: v for k, v in changed.items() if k.startswith(RECIPE_KEYS) and k in old and k in now}
        if recipe and not allow_recipe_change:
            raise ValueError(f"the checkpoint resumed (step {step}) was trained with other recipe settings: "
                             f"{describe(recipe)}. Set them back, start a new trainer.output_dir, or pass "
                             "--trainer.allow_recipe_change true to continue this run with the new ones")
        note(f"warning: resuming step {step} with changed settings: {describe(changed)} (recorded in the "
             "checkpoint's config history)")
        history.append({"step": step, "changed": {k: list(v) for k, v in changed.items()}})
    return {**new, HISTORY: history}


def check_precision(tag: Path, ds_config_path: str) -> None:
    """A bf16 tag (DeepSpeed's bf16_zero_pp_rank_* files) resumed with a JSON without bf16 fails inside
    DeepSpeed with a FileNotFoundError (measured): say so first."""
    try:
        new_bf16 = bool(json.loads(Path(ds_config_path).read_text()).get("bf16", {}).get("enabled", False))
    except (OSError, ValueError, AttributeError):
        return  # preflight names an unreadable JSON
    if not new_bf16 and any(tag.glob("bf16_zero_pp_rank_*")):
        raise ValueError(f"deepspeed_config {ds_config_path} has no bf16 section, but {tag} was saved in "
                         "bf16: "
                         "DeepSpeed cannot resume it in another precision; resume with the checkpoint's "
                         "DeepSpeed JSON (e.g. ds_configs/zero2_bf16.json) or start a new trainer.output_dir")
