"""Host-to-device copies without hidden syncs.

A copy from pageable host memory to a CUDA device is synchronous: the host waits for the stream to
drain before the copy starts (CUDA programming guide, "Asynchronous concurrent execution"), so each
`cpu_tensor.to("cuda")` in the training loop is a host sync. A copy from pinned memory with
`non_blocking=True` is queued on the stream and the host runs on. Small per-step tensors (the
micro-batch's draws, optimizer scalars, token ids) therefore go through `to_device`: packed into one
pinned buffer, one non-blocking copy, split into views on the device. The values are copied, never
changed, so results are bitwise those of plain `.to(device)`.
"""

from __future__ import annotations

import torch


def pack(tensors: tuple[torch.Tensor, ...], pin: bool = False) -> torch.Tensor:
    """Concatenate flattened tensors of one dtype into one new 1-D buffer (pinned if `pin`).

    Shape: tensors of any shapes, N elements in all -> (N,).
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"pack needs tensors of one dtype, got {sorted(map(str, dtypes))}")
    total = sum(t.numel() for t in tensors)
    flat = torch.empty(total, dtype=tensors[0].dtype, pin_memory=pin)
    torch.cat([t.reshape(-1) for t in tensors], out=flat)
    return flat


def unpack(flat: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Views of `flat` with the shapes of `like`, in order (the inverse of `pack`)."""
    parts = flat.split([t.numel() for t in like])
    return tuple(part.view(t.shape) for part, t in zip(parts, like, strict=True))


def to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CPU tensors of one dtype on `device` through one non-blocking copy (pinned staging on CUDA).

    On the CPU the tensors are returned as they are. The pinned buffer stays alive until the copy is
    done: torch's caching host allocator records the copy's stream event before it reuses the block.
    """
    if device.type == "cpu":
        return tensors
    flat = pack(tensors, pin=device.type == "cuda")
    return unpack(flat.to(device, non_blocking=True), tensors)
