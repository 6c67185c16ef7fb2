"""The ztsnr_ds.* safetensors metadata of our exports (export.export_metadata), read back and checked.

Every value is parsed by its own rule, so a damaged or hostile file names its bad key (ValueError) instead
of failing later with a traceback, or worse, sampling on a table it was not trained on.
"""

from __future__ import annotations

from collections.abc import Callable

from ztsnr_ds.schedule import ZTSNR_MODES

NOISE_SETTINGS = ("ztsnr", "sigma_max", "base_area")  # base_area None: no resolution scaling


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return text
    return parse


def _positive(cast: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = cast(text)
        if not 0 < value < float("inf"):
            raise ValueError("not a positive finite number")
        return value
    return parse


_RULES: dict[str, Callable[[str], object]] = {
    "ztsnr": _one_of(ZTSNR_MODES), "sigma_max": _positive(float),
    "base_area": lambda t: None if t == "None" else _positive(int)(t),
    "dropout_mode": _one_of(("empty", "zeros")), "max_chunks": _positive(int),
}
"""How each ztsnr_ds.<key> metadata value is parsed and checked."""


def metadata_value(metadata: dict[str, str], key: str) -> object:
    """ztsnr_ds.<key> of a model's metadata, parsed and checked; ValueError naming the key if unusable."""
    text = metadata[f"ztsnr_ds.{key}"]
    try:
        return _RULES[key](text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"its metadata ztsnr_ds.{key} = {str(text)[:40]!r} is unusable ({e}): the file is "
                         "damaged or was not written by ztsnr_ds; re-export the model with launch/export.py"
                         ) from None


def recorded(metadata: dict[str, str], key: str) -> object | None:
    """metadata_value, or None where the file records no ztsnr_ds.<key>."""
    return metadata_value(metadata, key) if f"ztsnr_ds.{key}" in metadata else None


def noise_from_metadata(metadata: dict[str, str]) -> dict:
    """NOISE_SETTINGS the metadata records (base_area None: no resolution scaling)."""
    return {key: metadata_value(metadata, key) for key in NOISE_SETTINGS if f"ztsnr_ds.{key}" in metadata}
