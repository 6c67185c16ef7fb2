"""A fine-tune as a LoRA: the truncated SVD of (tuned - base) per linear and convolution layer.

For a layer's weight delta D (out, in[, kh, kw]) flattened to M = D.reshape(out, -1), the SVD
M = U S V^T truncated to k singular values is the best rank-k approximation in Frobenius norm
(Eckart-Young). Stored as kohya's LoRA (the format ComfyUI, A1111 and Forge load):
  <name>.lora_up.weight   = U_k S_k            (out, k)         [conv: (out, k, 1, 1)]
  <name>.lora_down.weight = V_k^T              (k, in)          [conv: (k, in, kh, kw)]
  <name>.alpha            = k                  so the client's scale alpha / k is 1,
and a client patches W <- W + (alpha / k) * up @ down. Kept energy of a layer: sum(S_k^2) / sum(S^2),
the share of the delta's squared Frobenius norm the LoRA reproduces.

Names are kohya's: `lora_unet_` + the SGM module path (`input_blocks_4_1_proj_in`), `lora_te1_` / `lora_te2_`
+ the transformers path of CLIP-L / bigG (`text_model_encoder_layers_0_self_attn_q_proj`). Pure functions
of state dicts; launch/extract_lora.py loads the models and writes the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNET = "lora_unet"
TE1, TE2 = "lora_te1", "lora_te2"
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")  # the encoder layers' linears (what ComfyUI maps for lora_te*)


@dataclass(frozen=True)
class LayerReport:
    """What the LoRA keeps of one layer's delta."""

    name: str  # kohya name, e.g. lora_unet_input_blocks_4_1_proj_in
    rank: int  # singular values kept
    energy: float  # sum(S_k^2) / sum(S^2): 1.0 is the whole delta
    delta_norm: float  # ||D||_F


def kohya_name(prefix: str, module: str) -> str:
    """`lora_unet` + `input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return f"{prefix}_{module.replace('.', '_')}"


def lora_layers(state: dict[str, Tensor], prefix: str, text: bool = False) -> dict[str, str]:
    """kohya name -> weight key of every LoRA-able layer: 2-D (linear) and 4-D (conv) weights; for text
    encoders (text=True) the encoder layers' TEXT_LAYERS only. `state` keys: SGM module paths (UNet) or
    transformers paths with `text_model.` (text encoders)."""
    out = {}
    for key, value in state.items():
        module = key.removesuffix(".weight")
        if module == key or value.ndim not in (2, 4):
            continue
        if text and not (".encoder.layers." in module and module.endswith(TEXT_LAYERS)):
            continue
        out[kohya_name(prefix, module)] = key
    return out


def truncated_svd(delta: Tensor, rank: int, threshold: float | None = None) -> tuple[Tensor, Tensor, float]:
    """(up, down, kept energy) of the best rank-k approximation of `delta` (any shape (out, ...)).

    k = min(rank, out, in); with `threshold` in (0, 1], the smallest k <= that whose kept energy
    sum(S_k^2) / sum(S^2) reaches it. Shape: up (out, k), down (k, prod(rest)); fp32.
    """
    matrix = delta.float().reshape(delta.shape[0], -1)  # (out, in * kh * kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.square().cumsum(0)
    total = float(energy[-1])
    k = min(rank, s.numel())
    if threshold is not None and total > 0:
        k = min(k, int(torch.searchsorted(energy / total, torch.tensor(threshold * (1 - 1e-7)))) + 1)
    kept = float(energy[k - 1]) / total if total > 0 else 1.0
    return u[:, :k] * s[:k], vh[:k], kept


def extract(base: dict[str, Tensor], tuned: dict[str, Tensor], layers: dict[str, str], rank: int,
            threshold: float | None = None, dtype: torch.dtype = torch.float16,
            device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], list[LayerReport]]:
    """LoRA tensors (kohya keys, on the CPU) of every layer in `layers` whose weight differs, and a report
    per layer. Layers whose delta is exactly zero get no keys (and no report line). The SVDs run on
    `device` (a GPU: SDXL's ~800 layers take minutes on a CPU)."""
    tensors, reports = {}, []
    for name, key in layers.items():
        delta = tuned[key].to(device, torch.float32) - base[key].to(device, torch.float32)
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0:
            continue
        up, down, kept = truncated_svd(delta, rank, threshold)
        k = up.shape[1]
        if delta.ndim == 4:  # conv: up is a 1x1 conv after a down conv of the layer's kernel
            up = up[:, :, None, None]  # (out, k, 1, 1)
            down = down.reshape(k, *delta.shape[1:])  # (k, in, kh, kw)
        tensors |= {f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
                    f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
                    f"{name}.alpha": torch.tensor(float(k), dtype=dtype)}
        reports.append(LayerReport(name, k, kept, norm))
    return tensors, reports


def apply(base: dict[str, Tensor], lora: dict[str, Tensor], layers: dict[str, str],
          strength: float = 1.0) -> dict[str, Tensor]:
    """`base` with each LoRA layer added: W + strength * (alpha / k) * up @ down (what the clients do)."""
    out = dict(base)
    for name, key in layers.items():
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        scale = strength * float(lora[f"{name}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)  # (out, k) @ (k, in...) -> W's
        out[key] = (base[key].float() + scale * delta).to(base[key].dtype)
    return out


def dropped_energy(base: dict[str, Tensor], tuned: dict[str, Tensor], layers: dict[str, str]) -> float:
    """Share of the whole delta's squared norm in weights no LoRA layer holds (norms, biases, embeddings)."""
    covered = set(layers.values())
    squares = {k: float((tuned[k].float() - base[k].float()).square().sum()) for k in base}
    total = sum(squares.values())
    return sum(v for k, v in squares.items() if k not in covered) / total if total else 0.0


def summary(reports: list[LayerReport], dropped: float) -> str:
    """Kept energy over layers, weighted by each layer's delta: the lines extract_lora prints."""
    if not reports:
        return "no layer differs between base and tuned: nothing to extract"
    weights = torch.tensor([r.delta_norm ** 2 for r in reports])
    energy = torch.tensor([r.energy for r in reports])
    worst = sorted(reports, key=lambda r: r.energy)[:5]
    return "\n".join([
        f"{len(reports)} layers, ranks {min(r.rank for r in reports)}..{max(r.rank for r in reports)}; kept "
        f"energy: overall {float((weights * energy).sum() / weights.sum()):.4f}, median "
        f"{float(energy.median()):.4f}, min {float(energy.min()):.4f}",
        "lowest: " + ", ".join(f"{r.name} {r.energy:.3f}" for r in worst),
        f"not in any LoRA layer (norms, biases, embeddings): {dropped:.2e} of the delta's energy",
    ])
