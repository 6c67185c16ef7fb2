"""Faults and hostile input: wrong-run resumes, crafted and damaged checkpoints, full disks, stale locks,
pre-emption under the `deepspeed` launcher, config errors that must fail before any model loads.

One run of the tiny model (in-process, real DeepSpeed engine) is shared: its checkpoint is copied,
damaged and crafted; its engine saves onto tiny tmpfs mounts. One run goes through the `deepspeed`
launcher: `--trainer.resume none --trainer.overwrite true` over the first run's output_dir, killed by
SIGTERM to the whole process group.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ztsnr_ds import checkpoint, integrity, locks, safe_load
from ztsnr_ds.config import ConfigError, parse
from ztsnr_ds.engine import init_distributed
from ztsnr_ds.export import ExportError, export_diffusers, load_checkpoint
from ztsnr_ds.trainer import READY_LINE, Trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = "mp_rank_00_model_states.pt"
BATCH_KEY = "train_micro_batch_size_per_gpu"
STAGE_7 = {"zero_optimization": {"stage": 7}}


@pytest.fixture(scope="module")
def run_config(make_run_config) -> Path:
    trainer = {"micro_batch": 2, "max_steps": 2, "save_every": 2, "log_every": 1, "warmup_steps": 1,
               "keep_last": 1}
    return make_run_config("faults", 8, trainer, {"every": 0})


@pytest.fixture(scope="module")
def first_run(run_config, tmp_path_factory) -> Trainer:
    """A finished 2-step run (tag step00000002) whose engine later tests save with."""
    out = tmp_path_factory.mktemp("first") / "run"
    cfg, config_dict = parse(["--config", str(run_config), "--trainer.output_dir", str(out)])
    trainer = Trainer(cfg, config_dict, init_distributed())
    trainer.train()
    return trainer


@pytest.fixture
def tag(first_run, tmp_path) -> Path:
    """A private copy of the first run's complete tag."""
    dest = tmp_path / "run" / "checkpoints" / checkpoint.tag_for(2)
    shutil.copytree(first_run.output_dir / "checkpoints" / dest.name, dest)
    return dest


def env() -> dict[str, str]:
    out = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        out.pop(key, None)
    return out


# ------------------------------------------------------------------------------ config errors, early
@pytest.fixture
def bad_ds_json(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "ds.json"
        path.write_text(text)
        return str(path)
    return write


@pytest.mark.parametrize("case, key", [
    ("batch", BATCH_KEY),
    ("malformed", "deepspeed_config"),
    ("stage7", "zero_optimization.stage"),
    ("alignment", "zero_optimization.parameter_alignment"),
    ("no_overflow_check", "bf16.check_grad_overflow"),
    ("more_ranks_than_images", "trainer.micro_batch"),
    ("eps", "optimizer.eps"),
    ("missing_tag", "trainer.resume"),
    ("schedule", "validation.schedule"),
    ("resume_none_over_checkpoints", "trainer.resume"),
])
def test_config_errors_exit_before_any_model_loads(run_config, bad_ds_json, tmp_path, monkeypatch, case, key):
    if case == "more_ranks_than_images":  # any micro_batch trains (tails), but every rank needs a sample
        monkeypatch.setenv("WORLD_SIZE", "9")
    base = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    (tmp_path / "out" / "checkpoints" / checkpoint.tag_for(3)).mkdir(parents=True)
    args = {
        "batch": lambda: ["--deepspeed_config", bad_ds_json(json.dumps(base | {BATCH_KEY: 7}))],
        "malformed": lambda: ["--deepspeed_config", bad_ds_json('{"bf16": {"enabled": true,}')],
        "stage7": lambda: ["--deepspeed_config", bad_ds_json(json.dumps(base | STAGE_7))],
        "alignment": lambda: ["--deepspeed_config", bad_ds_json(json.dumps(
            base | {"zero_optimization": base["zero_optimization"] | {"parameter_alignment": True}}))],
        "no_overflow_check": lambda: ["--deepspeed_config", bad_ds_json(json.dumps(
            base | {"bf16": base["bf16"] | {"check_grad_overflow": False}}))],
        "more_ranks_than_images": lambda: [],  # 8 images in the cache, 9 ranks (WORLD_SIZE below)
        "eps": lambda: ["--optimizer.eps", "-1"],
        "missing_tag": lambda: ["--trainer.resume", str(tmp_path / "nope" / "step00000001")],
        "schedule": lambda: ["--validation.schedule", "bogus"],
        "resume_none_over_checkpoints": lambda: ["--trainer.resume", "none"],
    }[case]()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:  # parse() builds no model
        parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path / "out"), *args])
    if case == "resume_none_over_checkpoints":
        assert str(tmp_path / "out") in str(err.value) and "--trainer.overwrite true" in str(err.value)


# ------------------------------------------------------------------------------ rotation
def _fake_tag(checkpoint_dir: Path, step: int) -> Path:
    tag = checkpoint_dir / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / checkpoint.STATE_FILE).write_text("{}")
    return tag


def test_rotation_keeps_the_tag_just_written_and_leaves_newer_ones(tmp_path):
    old, newer = _fake_tag(tmp_path, 1), _fake_tag(tmp_path, 10)
    (tmp_path / checkpoint.tag_for(0)).mkdir()  # incomplete, older
    current = _fake_tag(tmp_path, 2)
    checkpoint._rotate(tmp_path, 1, current)
    assert sorted(p.name for p in tmp_path.iterdir()) == [current.name, newer.name]
    assert not old.exists()


RESAVE = """
import json, sys, torch
from pathlib import Path
from ztsnr_ds import checkpoint, engine
from ztsnr_ds.models import load_unet
out, model, state = Path(sys.argv[1]), sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
dist = engine.init_distributed()
unet = load_unet(model, dtype=torch.bfloat16)
ds_engine = engine.initialize(unet, torch.optim.AdamW(unet.parameters()),
                              engine.build_ds_config("ds_configs/zero2_bf16.json", 1, 1, 1))
checkpoint.save(ds_engine, out, 2, state, keep_last=1, is_main=True)
"""


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def test_kill_while_saving_a_tag_again_leaves_it_incomplete(first_run, tag, tiny_sdxl, tmp_path):
    """SIGKILL a re-save of an existing complete tag as soon as it touches the tag: never 'complete'."""
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(first_run.state()))
    before = _identity(tag / MODEL_FILE)
    proc = subprocess.Popen([sys.executable, "-c", RESAVE, str(tag.parent.parent), str(tiny_sdxl),
                             str(state_file)], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def touched() -> bool:
        try:
            return _identity(tag / MODEL_FILE) != before or not (tag / checkpoint.STATE_FILE).exists()
        except FileNotFoundError:
            return True
    while proc.poll() is None and not touched():
        time.sleep(0.001)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert not (tag / checkpoint.STATE_FILE).exists()
    assert checkpoint.complete_tags(tag.parent) == []


# ------------------------------------------------------------------------------ safe loading
class _Payload:
    """Unpickling this writes a marker file: what a crafted checkpoint can do to weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _craft(tag: Path, marker: Path) -> None:
    """Replace the model file by one carrying the payload, with matching checksums (as an attacker would)."""
    torch.save({"payload": _Payload(marker)}, tag / MODEL_FILE)
    sums = json.loads((tag / integrity.CHECKSUM_FILE).read_text())
    sums[MODEL_FILE] = integrity.sha256(tag / MODEL_FILE)
    (tag / integrity.CHECKSUM_FILE).write_text(json.dumps(sums))


def test_crafted_checkpoint_is_refused_by_export_sample_and_resume(tag, run_config, tmp_path, capsys):
    marker = tmp_path / "marker"
    _craft(tag, marker)
    export_main = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    assert export_main(["--checkpoint", str(tag), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 2
    assert "builtins.exec" in capsys.readouterr().err and not (tmp_path / "e").exists()
    sample_main = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--model", str(tag), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s"),
                     "--width", "64", "--height", "64"])
    assert exit_.value.code == 2 and "builtins.exec" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="trainer.resume.*builtins.exec"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(tag.parent.parent),
               "--trainer.resume", str(tag)])
    # Even unchecked, DeepSpeed's own loader now runs with weights_only forced.
    with safe_load.weights_only(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tag / MODEL_FILE, weights_only=False)
    assert not marker.exists()
    torch.load(tag / MODEL_FILE, weights_only=False)  # the control: unsafe loading does run it
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------------------ damaged checkpoints
def test_damaged_checkpoints_give_clear_errors(first_run, tag, tmp_path):
    optim = next(tag.glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    optim.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{optim.name} does not match its sha256"):
        load_checkpoint(tag)
    with pytest.raises(checkpoint.CheckpointError, match=f"{optim.name} does not match its sha256"):
        checkpoint.load(first_run.engine, tag, True)
    (tag / integrity.CHECKSUM_FILE).unlink()  # a tag without checksums: files are still read safely
    for cut in (0, len(data) // 3):
        optim.write_bytes(bytes(data[:cut]))
        with pytest.warns(UserWarning, match="cannot be verified"), \
                pytest.raises(ExportError, match=f"{optim.name} is not a readable torch file"):
            load_checkpoint(tag)
    (tag / checkpoint.STATE_FILE).write_bytes(b"\x00garbage{")
    with pytest.raises(ExportError, match=f"{checkpoint.STATE_FILE} is unreadable"):
        load_checkpoint(tag)


# ------------------------------------------------------------------------------ full disk
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (needs root); yields a function mounting one of the given size."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip()}): needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: a failed writer may hold a fd


def test_full_disk_is_named_before_and_during_a_save(first_run, tmpfs):
    engine, state = first_run.engine, first_run.state()
    small = tmpfs("4m")  # the first save is estimated from the parameter count: ~41 MiB
    message = rf"no space left on {small}/checkpoints: .* MiB free, a checkpoint needs ~\d+\.\d MiB"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.save(engine, small, 5, state, keep_last=1, is_main=True)
    assert not (small / "checkpoints" / checkpoint.tag_for(5)).exists()
    # An existing tag, complete but tiny (the 0-byte optimizer file): the estimate passes, the
    # re-save must unmark it first, then runs out of space mid-write and removes the partial tag.
    disk = tmpfs("8m")
    old = _fake_tag(disk / "checkpoints", 5)
    (old / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left on .*partial step00000005 removed"):
        checkpoint.save(engine, disk, 5, state, keep_last=1, is_main=True)
    assert list((disk / "checkpoints").iterdir()) == []  # no partial tag keeps the disk full


def test_failed_diffusers_export_leaves_nothing_behind(first_run, tmpfs):
    disk = tmpfs("1m")
    trained = load_checkpoint(first_run.output_dir)
    with pytest.raises(Exception):  # noqa: B017 (safetensors reports the full disk in its own type)
        export_diffusers(trained, disk / "export")
    assert list(disk.iterdir()) == []


# ------------------------------------------------------------------------------ locks
def test_stale_build_lock_is_refused_naming_the_file(tmp_path, monkeypatch):
    """Isolated from the machine: whether a ninja runs elsewhere on it is stubbed, both ways."""
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(locks, "builds_running", lambda: False)
    locks.check_build_locks()  # fresh: a build may hold it
    old = lock.stat().st_mtime - 600
    os.utime(lock, (old, old))
    with pytest.raises(locks.StaleLock, match=f"rm {lock}"):
        locks.check_build_locks()
    monkeypatch.setattr(locks, "builds_running", lambda: True)  # a live build (ninja) may own it: wait
    locks.check_build_locks()


def test_run_lock_waits_for_the_live_run(tmp_path):
    """The holder keeps the lock until its stdin closes (no clock): a waiter times out while it lives, and
    a patient one gets the lock only after the holder has gone."""
    code = ("import sys; from pathlib import Path; from ztsnr_ds.locks import hold_run_lock; "
            "hold_run_lock(Path(sys.argv[1]), 5); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(locks.StaleLock, match=f"held by pid {holder.pid}"):
        locks.hold_run_lock(tmp_path, timeout_s=0.5, poll_s=0.1)
    taken: list[int] = []
    waiter = threading.Thread(target=lambda: taken.append(locks.hold_run_lock(tmp_path, math.inf, 0.05)))
    waiter.start()
    waiter.join(0.5)
    assert not taken and holder.poll() is None  # still held: the waiter waits
    holder.stdin.close()
    waiter.join()
    assert holder.wait() == 0 and len(taken) == 1
    os.close(taken[0])


def test_sigterm_during_the_jit_build_exits_cleanly_and_releases_the_lock(run_config, tmp_path):
    """A private, empty torch extensions folder makes DeepSpeed build its shm op at start-up; the
    whole process group (python, ninja, the compiler) gets SIGTERM while torch holds the build lock."""
    build_root = tmp_path / "torch_extensions"
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(run_config),
                             "--trainer.output_dir", str(tmp_path / "run")], cwd=ROOT,
                            env=env() | {"TORCH_EXTENSIONS_DIR": str(build_root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while proc.poll() is None and not list(build_root.glob("**/lock")):  # the build's readiness: its lock
        time.sleep(0.05)
    assert list(build_root.glob("**/lock")), proc.communicate()[0][-3000:] if proc.poll() is not None else ""
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]
    assert list(build_root.glob("**/lock")) == []  # the next DeepSpeed start will not hang on it


# ------------------------------------------------------------------------------ through the launchers
def _read_until(proc: subprocess.Popen, line: str, lines: list[str]) -> None:
    """Collect proc's stdout into `lines` (on a thread) and wait until `line` appears or stdout ends."""
    seen = threading.Event()  # set by the line, or by the end of stdout (the process died)

    def pump():
        for text in proc.stdout:
            lines.append(text)
            if line in text:
                seen.set()
        seen.set()
    threading.Thread(target=pump, daemon=True).start()
    seen.wait()
    assert any(line in text for text in lines), "".join(lines)[-3000:]


def test_overwrite_and_preemption_under_the_deepspeed_launcher(first_run, run_config, tmp_path):
    """A new run over an old one's output_dir (resume none + overwrite), pre-empted by SIGTERM to the
    whole `deepspeed` process group: the launcher exits at once, the worker saves under its run lock."""
    out = tmp_path / "run"
    shutil.copytree(first_run.output_dir, out)  # the old run: tag step00000002 and its metrics
    (out / "metrics.jsonl").unlink()
    old_digest = integrity.sha256(out / "checkpoints" / checkpoint.tag_for(2) / MODEL_FILE)
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv's `deepspeed`
    proc = subprocess.Popen(["deepspeed", "--num_gpus", "1", "--master_port", str(_free_port()),
                             "launch/train.py", "--config", str(run_config), "--trainer.output_dir", str(out),
                             "--trainer.resume", "none", "--trainer.overwrite", "true",
                             "--trainer.max_steps", "100000", "--trainer.save_every", "100000"],
                            cwd=ROOT, env=env() | {"PATH": path}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    _read_until(proc, READY_LINE, lines)
    moved = list((out / "replaced").glob(f"*/{checkpoint.tag_for(2)}"))  # moved before any model loaded
    assert len(moved) == 1 and integrity.sha256(moved[0] / MODEL_FILE) == old_digest
    assert not (out / "checkpoints" / checkpoint.tag_for(2)).exists()
    while proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    # The launcher is gone; the worker may still be saving. A new run takes the run lock first, as here:
    fd = locks.hold_run_lock(out, timeout_s=math.inf, poll_s=0.1)
    try:
        tags = checkpoint.complete_tags(out / "checkpoints")
        last_step = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines())
        assert [checkpoint.read_state(t)["step"] for t in tags] == [last_step], "".join(lines)[-3000:]
        assert checkpoint.verify(tags[-1]) == []
        assert (out / "checkpoints" / "latest").read_text() == tags[-1].name
    finally:
        os.close(fd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ non-finite micro-batches
class _Saved:
    """A tensor saved for backward (saved_tensors_hooks' packed object): counts how many are alive.
    Detached: an output saved with its grad_fn would make a cycle through the graph that gc cannot see."""

    alive = 0

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        _Saved.alive += 1

    def __del__(self) -> None:
        _Saved.alive -= 1


def test_a_skipped_micro_batch_frees_its_graph_before_the_replacement_forward():
    """Trainer.train_step on stand-ins (a 3-layer MLP as the UNet): the first micro-batch's loss is inf,
    the second replaces it. No tensor the skipped forward saved for backward may be alive when the
    replacement forward starts (before the fix: all of them, ~1x the activations on top of the new ones)."""
    init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    alive_at_forward = []

    def forward_loss(batch, bucket, ids):
        alive_at_forward.append(_Saved.alive)
        per_sample = model(torch.randn(len(ids), 8)).square().mean(dim=1)
        return per_sample * (float("inf") if len(alive_at_forward) == 1 else 1.0), torch.ones(len(ids))

    stub = SimpleNamespace(
        cfg=SimpleNamespace(trainer=SimpleNamespace(grad_accum=1, max_nonfinite=3)),
        dist=SimpleNamespace(world_size=1, is_main=False), step=0, nonfinite_total=0,
        sampler=SimpleNamespace(upcoming_samples=lambda steps: 4), forward_loss=forward_loss,
        cache=SimpleNamespace(batch=lambda ids: {}), bands=SimpleNamespace(add=lambda *args: None),
        engine=SimpleNamespace(backward=lambda loss: loss.backward(), step=lambda: None))
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda saved: saved.tensor):
        loss = Trainer.train_step(stub, iter([("64x64", [0, 1, 2, 3])] * 2))
    assert alive_at_forward == [0, 0] and stub.nonfinite_total == 1 and math.isfinite(loss)
    assert _Saved.alive == 0  # the good micro-batch's graph went with its backward
# ------------------------------------------------------------------------------ integrity end to end
# The fault table of docs/integrity.md, one test per row (data-side rows: tests/test_faults_data.py).
def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def test_marker_flip_that_stays_json_is_refused(first_run, tag, run_config, tmp_path):
    """Row 'marker not covered': step 2 -> 3 (valid JSON) was a silently skipped step on resume."""
    checkpoint.read_state(tag)  # intact
    state_path = tag / checkpoint.STATE_FILE
    state_path.write_text(state_path.read_text().replace('"step": 2', '"step": 3'))
    message = f"{checkpoint.STATE_FILE} does not match its sha256 in {integrity.CHECKSUM_FILE}"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.read_state(tag)
    with pytest.raises(ExportError, match=message):
        load_checkpoint(tag)
    with pytest.raises(ConfigError, match=f"trainer.resume.*{message}"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(tag.parent.parent),
               "--trainer.resume", str(tag)])
    # A tag saved before the marker was covered still loads, with a one-line note.
    _edit_json(tag / integrity.CHECKSUM_FILE, lambda sums: sums.pop(checkpoint.STATE_FILE))
    with pytest.warns(UserWarning, match="not covered by checksums.json"):
        assert checkpoint.read_state(tag)["step"] == 3


@pytest.mark.parametrize("damage", ["torn_checksums", "torn_state", "checksums_not_a_map"])
def test_torn_checksums_or_marker_is_a_named_error_in_every_tool(tag, run_config, tmp_path, capsys, damage):
    path = tag / (checkpoint.STATE_FILE if damage == "torn_state" else integrity.CHECKSUM_FILE)
    path.write_text('["a", "b"]' if damage == "checksums_not_a_map" else path.read_text()[:40])
    export_main = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    assert export_main(["--checkpoint", str(tag), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 2
    assert path.name in capsys.readouterr().err
    sample_main = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--model", str(tag), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and path.name in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"trainer.resume.*{path.name}"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(tag.parent.parent),
               "--trainer.resume", str(tag)])


@pytest.mark.slow  # one ds_to_universal conversion in a subprocess
def test_universal_folder_is_checksummed_and_checked_on_load(first_run, tag):
    """Row 'universal/ excluded': made once, kept for every later resume; a damaged value loaded silently."""
    with pytest.warns(UserWarning, match="converted by an older version"):  # an old universal/: again
        (tag / checkpoint.UNIVERSAL_DIR).mkdir()
        out = checkpoint.to_universal(tag, is_main=True)
    sums = json.loads((out / integrity.CHECKSUM_FILE).read_text())
    assert sums and checkpoint.verify_universal(out) == []
    victim = out / sorted(n for n in sums if n.endswith(".pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{victim.name} does not match its sha256"):
        checkpoint.to_universal(tag, is_main=True)
    (out / "extra.pt").write_bytes(b"")
    assert any("extra.pt is not in its" in p for p in checkpoint.verify_universal(out))


def test_rotation_never_deletes_the_last_tag_holding_state_the_run_does_not_write(tmp_path):
    with_ema = _fake_tag(tmp_path, 1)
    (with_ema / "ema").mkdir()
    older = _fake_tag(tmp_path, 0)
    (older / "ema").mkdir()
    plain = [_fake_tag(tmp_path, step) for step in (2, 3)]
    with pytest.warns(UserWarning, match=f"rotation keeps {with_ema}.*ema/"):
        checkpoint._rotate(tmp_path, 1, plain[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [with_ema.name, plain[-1].name]
    assert not older.exists()  # only the newest tag holding the EMA is kept


def _write_ema_json(folder: Path, tracks: list[str]) -> None:
    folder.mkdir(parents=True)
    meta = {"format": 2, "updates": 2, "dtype": "fp32", "tracks": {t: {} for t in tracks},
            "groups": [[["w", [2]]]], "partition": [2], "world_size": 1}
    (folder / "ema.json").write_text(json.dumps(integrity.seal(meta)))


@pytest.mark.parametrize("tracks, args, key", [
    (["ema"], [], "ema.enabled"),
    (["ema", "sigma_rel_0.05", "sigma_rel_0.1"], ["--ema.enabled", "true"], "ema.posthoc"),
    (["ema", "sigma_rel_0.05", "sigma_rel_0.1"],
     ["--ema.enabled", "true", "--ema.posthoc", "true", "--ema.sigma_rels", "[0.07]"], "ema.sigma_rels"),
])
def test_resume_that_would_drop_the_ema_is_refused(tag, run_config, tracks, args, key):
    """Row 'EMA off on resume': refused, naming the key and the explicit override."""
    _write_ema_json(tag / "ema", tracks)
    argv = ["--config", str(run_config), "--trainer.output_dir", str(tag.parent.parent), *args]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .*--ema\.discard_saved true"):
        parse(argv)
    parse([*argv, "--ema.discard_saved", "true"])  # dropped on purpose: allowed


def _snapshots(first_run, out: Path, steps: tuple[int, ...]) -> list[Path]:
    from ztsnr_ds.ema import EMAConfig, ShardedEMA

    cfg = EMAConfig(enabled=True, posthoc=True, snapshot_dtype="fp32")
    tracker = ShardedEMA(cfg, first_run.engine, first_run.optimizer, 0, 1)
    folders = []
    for step in steps:
        tracker.update()
        folders.append(tracker.snapshot(out, step))
    return folders


def test_snapshot_metadata_is_sealed_and_its_folder_must_match_its_step(first_run, tmp_path):
    """Rows 'ema.json numbers not checksummed', 'swapped snapshot folders', 'ema.json without sha256/step',
    'torn newest snapshot skipped without a word'."""
    from ztsnr_ds.ema import EMAError
    from ztsnr_ds.posthoc import find_snapshots

    first, second = _snapshots(first_run, tmp_path, (2, 4))
    assert [s.step for s in find_snapshots(tmp_path)] == [2, 4]
    os.replace(second, tmp_path / "swap")  # swapped by name
    os.replace(first, second)
    os.replace(tmp_path / "swap", first)
    with pytest.raises(EMAError, match="records step 4, but its folder is step00000002"):
        find_snapshots(tmp_path)
    os.replace(first, tmp_path / "swap")
    os.replace(second, first)
    os.replace(tmp_path / "swap", second)
    text = (second / "ema.json").read_text()
    (second / "ema.json").write_text(text.replace('"updates": 2', '"updates": 3'))  # one digit, valid JSON
    with pytest.raises(EMAError, match="does not match its seal"):
        find_snapshots(tmp_path)
    (second / "ema.json").write_text(text)
    for key in ("sha256", "step"):
        meta = json.loads(text)
        meta.pop(key)
        (second / "ema.json").write_text(json.dumps(integrity.seal(meta)))
        with pytest.raises(EMAError, match=f"lacks a valid '{key}'"):
            find_snapshots(tmp_path)
    (second / "ema.json").unlink()  # torn newest: skipped, but said
    with pytest.warns(UserWarning, match=f"skipping {second}: no ema.json"):
        assert [s.step for s in find_snapshots(tmp_path)] == [2]


class _DiskFull:
    """safetensors' save_file as a full disk meets it: part of the file written, then its error."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensors, filename, metadata=None) -> None:
        from safetensors import SafetensorError

        self.calls += 1
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              '"No space left on device" })')


def test_disk_full_while_writing_a_snapshot_or_the_ema_file(first_run, tmp_path, monkeypatch):
    """Rows 'disk full during a snapshot / while a save writes its EMA file': the no-space message, no
    partial output (was a SafetensorError traceback and a 60 MB partial tag)."""
    from ztsnr_ds import ema

    cfg = ema.EMAConfig(enabled=True, posthoc=True)
    tracker = ema.ShardedEMA(cfg, first_run.engine, first_run.optimizer, 0, 1)
    monkeypatch.setattr(ema, "save_file", full := _DiskFull())
    with pytest.raises(integrity.NoSpaceError, match="no space left on .*ema_snapshots.*snapshot"):
        tracker.snapshot(tmp_path, 2)
    assert full.calls == 1 and list((tmp_path / ema.SNAPSHOT_DIR).iterdir()) == []
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left on .*partial step00000005 removed"):
        checkpoint.save(first_run.engine, tmp_path, 5, first_run.state(), 1, True,
                        lambda tag_dir: tracker.save(tag_dir / ema.EMA_DIR), tracker.nbytes())
    assert checkpoint.complete_tags(tmp_path / "checkpoints") == []
    assert not (tmp_path / "checkpoints" / checkpoint.tag_for(5)).exists()


def test_first_save_estimate_counts_the_ema_and_snapshots_their_bytes(first_run, tmp_path, monkeypatch):
    from ztsnr_ds import ema

    params = sum(p.numel() for p in first_run.engine.module.parameters())
    tracker = ema.ShardedEMA(ema.EMAConfig(enabled=True, posthoc=True, sigma_rels=[0.05, 0.1]),
                             first_run.engine, first_run.optimizer, 0, 1)
    padded = sum(tracker.layout.partition)
    assert padded >= params and tracker.nbytes() == 3 * 4 * padded  # ema + two power tracks, fp32
    assert checkpoint._estimate_size(first_run.engine, tmp_path, tracker.nbytes()) == \
        integrity.BYTES_PER_PARAM * params + 12 * padded
    need = 2 * 2 * padded  # the two power tracks in the snapshot dtype, bf16
    assert tracker.nbytes(("sigma_rel_0.05", "sigma_rel_0.1"), torch.bfloat16) == need
    monkeypatch.setattr(integrity, "free_bytes", lambda path: need - 1)
    with pytest.raises(integrity.NoSpaceError, match=rf"a snapshot needs ~{need / 2**20:.1f} MiB"):
        tracker.snapshot(tmp_path, 2)
    assert not (tmp_path / ema.SNAPSHOT_DIR).exists()


def test_full_disk_during_export_and_posthoc_exits_2_with_nothing_left(first_run, tmpfs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(first_run.output_dir, run)
    _snapshots(first_run, run, (2,))
    disk = tmpfs("1m")
    export_main = runpy.run_path(str(ROOT / "launch" / "export.py"))["main"]
    assert export_main(["--checkpoint", str(run), "--format", "diffusers", "--out", str(disk / "e")]) == 2
    assert "no space left on" in capsys.readouterr().err and list(disk.iterdir()) == []
    posthoc_main = runpy.run_path(str(ROOT / "launch" / "posthoc_ema.py"))["main"]
    assert posthoc_main(["--run", str(run), "--sigma-rel", "0.07", "--out", str(disk / "p.safetensors")]) == 2
    assert "no space left on" in capsys.readouterr().err and list(disk.iterdir()) == []


@pytest.mark.parametrize("text", ["/elsewhere/run/checkpoints/step00000002", "../other/step00000002",
                                  "step2", ""])
def test_latest_must_name_a_plain_tag_of_its_own_folder(tag, text):
    """Row '`latest` holding an absolute path exported another run's tag'."""
    (tag.parent / checkpoint.LATEST_FILE).write_text(text)
    with pytest.raises(ExportError, match="not a tag name like step00000100 of its own folder"):
        load_checkpoint(tag.parent.parent)


def test_startup_check_racing_a_live_runs_rotation_takes_the_newest_tag(tag, monkeypatch):
    """Row 'a second run's start-up check racing a live run's rotation reported a damaged tag'."""
    from ztsnr_ds import preflight

    newer = tag.parent / checkpoint.tag_for(4)
    shutil.copytree(tag, newer)
    real = safe_load.check_files

    def rotated_meanwhile(paths):
        paths = list(paths)
        if paths and paths[0].parent == newer:  # the live run deletes it while this run reads it
            shutil.rmtree(newer)
        return real(paths)
    monkeypatch.setattr(safe_load, "check_files", rotated_meanwhile)
    assert preflight.check_resume(tag.parent.parent, "auto", False) == tag
    assert not newer.exists()


def test_bad_model_paths_and_output_dir_fail_before_any_model_loads(run_config, tiny_sdxl, tmp_path):
    """Rows 'forged --model.unet_path found after the text encoders load', 'model.pretrained not a model',
    'output_dir that is a file'."""
    from safetensors.torch import save_file

    base = ["--config", str(run_config), "--trainer.output_dir", str(tmp_path / "out")]
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="model.unet_path: .*forged.safetensors is not a readable"):
        parse([*base, "--model.unet_path", str(forged)])
    save_file({"something.else": torch.zeros(2)}, str(forged))
    with pytest.raises(ConfigError, match="model.unet_path: .*holds no SDXL UNet weights"):
        parse([*base, "--model.unet_path", str(forged)])
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match="model.pretrained = .* is not a diffusers SDXL folder .*vae"):
        parse([*base, "--model.pretrained", str(not_a_model)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="trainer.output_dir = .* is a file"):
        parse(["--config", str(run_config), "--trainer.output_dir", str(tmp_path / "file")])


@pytest.mark.parametrize("key, value", [("sigma_max", "nan"), ("sigma_max", "abc"), ("ztsnr", "bogus"),
                                        ("base_area", "-4"), ("dropout_mode", "x" * 10000)])
def test_hostile_metadata_in_a_model_is_a_named_error(tmp_path, capsys, key, value):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(path), metadata={f"ztsnr_ds.{key}": value})
    sample_main = runpy.run_path(str(ROOT / "launch" / "sample.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--model", str(path), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"ztsnr_ds.{key}" in err and "Traceback" not in err and len(err) < 2000
