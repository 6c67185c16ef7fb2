"""Staged runs: `trainer.init_from` starts a NEW run from another run's checkpoint.

Resolution stages and dataset versions are chained this way (Kohaku-XL "resumed from rev1", NoobAI's
versions): the new run (its own trainer.output_dir) takes the source tag's weights, optimizer moments and
EMA (or, with trainer.init_weights_only, the weights alone: fresh moments, EMA from those weights), and
starts its own step count, LR schedule (warmup included) and sampler epoch at 0, on any number of ranks
(a tag of another world size is loaded through DeepSpeed's universal form, as resume does:
`checkpoint.load`). AdamW's per-parameter step t stays with its moments: their bias correction depends on it.

Lineage: the chain of runs a run started from, [{run, tag, step, weights}, ...] oldest first, is worked out
at config time (`run_lineage`) and kept in the config the trainer saves in every checkpoint's state, so
exports record it (`ztsnr_ds.lineage`) and a restart of the new run keeps it. Once the new run has its own
checkpoints, trainer.resume (auto) continues those and init_from is not applied again.
"""

from __future__ import annotations

from pathlib import Path

from ztsnr_ds import checkpoint
from ztsnr_ds.ema import EMA_DIR
from ztsnr_ds.export import ExportError, resolve_tag

LINEAGE = "lineage"  # key of the saved config (checkpoint.CONFIG): the runs this one started from


def source_tag(init_from: str | None) -> Path | None:
    """The tag trainer.init_from names: a run folder (its latest tag), its checkpoints/ folder or a tag."""
    if not init_from:
        return None
    try:
        return resolve_tag(init_from)
    except ExportError as err:
        raise ValueError(f"trainer.init_from: {err}") from err


def check(init_from: str | None, output_dir: str, resume: str) -> str | None:
    """init_from must name a complete tag outside trainer.output_dir (a new run; ValueError names the key).
    Returns a note when the run resumes a checkpoint of its own instead (a restart: init_from is done)."""
    tag = source_tag(init_from)
    if tag is None:
        return None
    if tag.resolve().is_relative_to(Path(output_dir).resolve()):
        raise ValueError(f"trainer.init_from = {init_from} lies in trainer.output_dir {output_dir}: "
                         "init_from starts a new run; set a new trainer.output_dir (or drop init_from to "
                         "resume that run)")
    own = checkpoint.find_resume_tag(Path(output_dir), resume)
    return None if own is None else (f"trainer.init_from: not applied, the run resumes its own checkpoint "
                                     f"{own} (it started from {tag} before)")


def run_lineage(output_dir: str, resume: str, init_from: str | None, weights_only: bool) -> list[dict]:
    """The runs this run started from: a resumed run keeps its checkpoint's; a new run with init_from
    gets the source's lineage plus the source itself; otherwise none."""
    resumed = checkpoint.find_resume_tag(Path(output_dir), resume)
    if resumed is not None:
        return checkpoint.read_state(resumed).get(checkpoint.CONFIG, {}).get(LINEAGE, [])
    tag = source_tag(init_from)
    if tag is None:
        return []
    state = checkpoint.read_state(tag)
    entry = {"run": str(tag.parent.parent), "tag": tag.name, "step": state[checkpoint.STEP],
             "weights": "weights_only" if weights_only else "all"}
    return [*state.get(checkpoint.CONFIG, {}).get(LINEAGE, []), entry]


def start(trainer) -> None:
    """Load trainer.init_from's tag into a freshly built Trainer (no checkpoint of its own to resume).

    Collective: every rank. Weights, optimizer state and RNG come from `checkpoint.load`; the step counts
    DeepSpeed restored are zeroed (the LR schedule reads engine.skipped_steps), the trainer's step and
    sampler stay at 0. weights only: the optimizer state is dropped (AdamWSR creates zero moments and
    t = 0 at the first step) and the EMA restarts from the loaded weights.
    """
    cfg = trainer.cfg.trainer
    tag = source_tag(cfg.init_from)
    if tag is None:
        return
    checkpoint.load(trainer.engine, tag, trainer.dist.is_main)
    engine = trainer.engine
    engine.global_steps = engine.global_samples = engine.skipped_steps = 0
    if cfg.init_weights_only:
        trainer.optimizer.state.clear()
    if trainer.ema is not None and cfg.init_weights_only:
        trainer.ema.reset()
    elif trainer.ema is not None:
        trainer.resume_ema(tag / EMA_DIR)
    if trainer.dist.is_main:
        what = "weights" if cfg.init_weights_only else "weights, optimizer state and EMA"
        print(f"new run from {tag} ({what}); step, LR schedule and epoch start at 0")
