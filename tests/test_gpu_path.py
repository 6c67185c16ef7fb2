"""The GPU path, as far as a CPU can check it: one host-to-device copy per micro-batch, the attention
backend and compile settings, the validation wait, and launch/gpu_check.py's dry run end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from ztsnr_ds import kernels
from ztsnr_ds.config import ModelConfig
from ztsnr_ds.device import pack, to_device, unpack
from ztsnr_ds.models import TINY_UNET_CONFIG

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_pack_and_unpack_copy_values_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    tensors = (torch.randn(3, 4, 2, 2, generator=gen), torch.tensor([float("nan"), -0.0, float("inf")]),
               torch.randn(3, 6, generator=gen))
    flat = pack(tensors)
    assert flat.shape == (48 + 3 + 18,)
    out = unpack(flat, tensors)
    assert [o.shape for o in out] == [t.shape for t in tensors]
    assert all(torch.equal(o.view(torch.int32), t.view(torch.int32)) for o, t in zip(out, tensors))
    assert to_device(torch.device("cpu"), *tensors) == tensors  # the CPU path copies nothing
    with pytest.raises(ValueError, match="one dtype"):
        pack((torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)))


@pytest.mark.parametrize("key, value", [("attention", "flash2"), ("compile", "max-autotune")])
def test_unknown_kernel_settings_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=rf"model\.{key} = '{value}' is not one of"):
        ModelConfig(pretrained="x", **{key: value})


def _unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]))
    cond = dict(encoder_hidden_states=torch.randn(2, 77, 64),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.full((2, 6), 128.0)})
    return unet, inputs, cond


def test_a_forced_attention_backend_runs_in_every_layer():
    """`math` gives bitwise what the stock processor gives inside a global math-only context; a backend the
    CPU lacks (efficient) fails in the layer, so the restriction really reaches the attention calls."""
    unet, inputs, cond = _unet_and_inputs()
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        reference = unet(*inputs, **cond).sample
    kernels.set_attention(unet, "math")
    with torch.no_grad():
        assert torch.equal(unet(*inputs, **cond).sample, reference)
    kernels.set_attention(unet, "efficient")
    with torch.no_grad(), pytest.raises(RuntimeError, match="No viable backend"):
        unet(*inputs, **cond)


def test_regional_compile_compiles_each_transformer_block_in_place():
    """What is compiled, without running it (a CPU compile of the tiny UNet takes ~30 s cold): every
    transformer block and nothing else; parameter names unchanged, so checkpoints are too."""
    unet, _, _ = _unet_and_inputs()
    names = list(unet.state_dict())
    blocks = [m for m in unet.modules() if type(m).__name__ == kernels.REGIONAL_BLOCK]
    # transformer_layers_per_block (1, 1, 2): down 2 x 1 + 2 x 2, mid 2, up 3 x 2 + 3 x 1
    assert kernels.compile_unet(unet, "regional") == len(blocks) == 17
    compiled = [m for m in unet.modules() if m._compiled_call_impl is not None]
    assert compiled == blocks and list(unet.state_dict()) == names
    assert kernels.compile_unet(unet, "none") == 0


def test_model_flop_per_sample_matches_design_for_sdxl_at_1024():
    """gpu_check's MFU numerator, counted on the meta device, against DESIGN.md sec. 9's 20.2e12."""
    sys.path.insert(0, str(ROOT))
    from launch.benches.mfu import flop_per_sample

    config = json.loads((ROOT / "configs" / "sdxl_unet" / "config.json").read_text())
    assert flop_per_sample(config, 1024) == pytest.approx(20.2e12, rel=0.005)


def _wait_worker(rank: int, port: int, out: Path) -> None:
    """Rank 0 'validates' for 2.5 s; rank 1 goes on to the next step's all_reduce. The default group times
    out after 1 s, so that all_reduce survives only if the trainer's wait held rank 1 back. The control
    keeps rank 0 out until rank 1's all_reduce has timed out (a store key, not a sleep)."""
    from ztsnr_ds.engine import DistInfo, wait_group
    from ztsnr_ds.trainer import Trainer

    # The store's rendezvous gets a minute (a loaded machine can take seconds to start the second
    # process); the 1 s timeout is the collectives' only.
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2,
                                         timeout=timedelta(seconds=1))
    group = wait_group()

    class Validating:  # what Trainer._validate_while_others_wait uses
        dist, wait_group = DistInfo(rank, 2, rank), group
        ema = None  # no EMA grid

        def validate(self) -> None:
            if rank == 0:
                time.sleep(2.5)

    Trainer._validate_while_others_wait(Validating())
    flag = torch.ones(1)
    torch.distributed.all_reduce(flag)
    result = {"waited": float(flag)}
    try:  # the control, without the wait: rank 0 stays out of the all_reduce until rank 1 is done with it
        if rank == 0:
            store.wait(["control_done"], timedelta(days=1))  # no clock: rank 1's outcome, however slow
        torch.distributed.all_reduce(torch.ones(1))
        result["control"] = "no timeout"
    except RuntimeError as err:
        result["control"] = str(err)[:200]
    if rank == 1:
        store.set("control_done", "1")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # after a timed-out gloo op, the process group's destructor may abort the process


def test_other_ranks_outwait_a_validation_longer_than_the_collective_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_wait_worker, args=(port, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["waited"] for r in results] == [2.0, 2.0]
    assert "Timed out" in results[1]["control"]  # without the wait, rank 1's all_reduce gives up


def test_gpu_check_dry_run_passes(tmp_path):
    """launch/gpu_check.py --dry-run, as a user runs it: every check passes and the report says what held."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["resume", "optimizer", "sdxl", "kernels", "export", "ema"]
    assert report["failed"] is None
    resume = checks["resume"]["details"]
    assert resume["returncode"] == -9 and resume["killed_after_step"] >= 6
    assert resume["resumed_from"] in (4, 8) and resume["steps_compared"] == 12
    optimizer = checks["optimizer"]["details"]
    assert set(optimizer["differing_elements_kahan"]) == {"param", "exp_avg", "exp_avg_sq", "kahan_comp"}
    assert not any(optimizer["differing_elements"].values())
    assert not any(optimizer["differing_elements_kahan"].values())
    rows = checks["sdxl"]["details"]["rows"]
    assert [(r["checkpointing"], r["batch"]) for r in rows] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["samples_per_s"] > 0 for r in rows)
    assert [r["attention"] for r in checks["kernels"]["details"]["rows"]] == ["flash", "math"]
    assert len(checks["export"]["details"]["images"]) == 4
    assert "| 1 | resume | pass |" in (tmp_path / "gpu_check.md").read_text()
    ema = checks["ema"]["details"]  # check 3 ran without the EMA; check 6 runs it on the device
    assert len(ema["holdout"]) == 3 and ema["rebuilt_gap"] <= 1e-6
    assert not list((tmp_path / "work" / "sdxl").rglob("ema")) and not (tmp_path / "work" / "sdxl" /
                                                                         "ema_snapshots").exists()
