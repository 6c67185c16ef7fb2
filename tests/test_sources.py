"""Source scanning and safe image loading, on real files written to tmp_path."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ztsnr_ds.data.sources import (
    MISSING_CAPTION,
    UNSUPPORTED,
    BadImage,
    ImageRecord,
    Problem,
    in_share,
    load_image,
    scan_share,
    scan_source,
    summarize_problems,
    to_rgb,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# ---- colour modes ------------------------------------------------------------------------------


def _palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))  # left half index 1 (blue), right half index 0 (red)
    if transparent:
        img.info["transparency"] = 0
    return img


def _alpha(mode: str) -> Image.Image:
    """Left half opaque colour, right half fully transparent, so the right must come out white."""
    colour = (255, 0, 0, 255) if mode == "RGBA" else (0, 255)
    img = Image.new(mode, (8, 8), colour)
    img.paste((0, 0, 0, 0) if mode == "RGBA" else (0, 0), (4, 0, 8, 8))
    return img


# name -> (file name, image, expected left half RGB, expected right half RGB, tolerance)
CASES = {
    "1": ("bw.png", Image.new("1", (8, 8), 1), WHITE, WHITE, 0),
    "L": ("grey.png", Image.new("L", (8, 8), 100), (100,) * 3, (100,) * 3, 0),
    "LA": ("grey_alpha.png", _alpha("LA"), (0, 0, 0), WHITE, 0),
    "P": ("palette.png", _palette_image(False), BLUE, RED, 0),
    "P+transparency": ("palette_t.png", _palette_image(True), BLUE, WHITE, 0),
    "RGB": ("rgb.webp", Image.new("RGB", (8, 8), GREEN), GREEN, GREEN, 8),
    "RGBA": ("rgba.PNG", _alpha("RGBA"), RED, WHITE, 0),
    "CMYK": ("cmyk.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0)), (0, 255, 255), (0, 255, 255), 8),
    "I;16": ("deep.png", Image.fromarray(np.full((8, 8), 16416, np.uint16)), (64,) * 3, (64,) * 3, 0),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    name, img, left, right, tol = CASES[mode]
    path = tmp_path / name
    img.save(path, quality=95) if name.endswith("jpg") else img.save(path)
    with Image.open(path) as raw:
        assert raw.mode == img.mode  # the file really holds the mode under test
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    px = _pixels(out)
    assert np.abs(px[:, :4] - left).max() <= tol
    assert np.abs(px[:, 4:] - right).max() <= tol


def test_alpha_is_composited_over_white_with_partial_alpha():
    out = _pixels(to_rgb(Image.new("RGBA", (2, 2), (0, 0, 255, 64))))
    # over white: c = a * fg + (1 - a) * 255 with a = 64 / 255
    expected = np.rint(np.array([0, 0, 255]) * 64 / 255 + 255 * (1 - 64 / 255))
    assert np.abs(out - expected).max() <= 1


def test_32bit_integer_grey_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 257, 32768, 65535, 70000]], np.int32))
    assert img.mode == "I"
    assert _pixels(to_rgb(img))[0, :, 0].tolist() == [0, 1, 128, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    # stored 40 wide x 20 tall: quadrants red, green / blue, white
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:10, :20], arr[:10, 20:], arr[10:, :20], arr[10:, 20:] = RED, GREEN, BLUE, WHITE
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    expected = np.rot90(arr, k=-1).astype(np.int16)  # k=-1: clockwise
    # compare quadrant means (JPEG blurs the edges)
    got, want = _pixels(out), expected
    for rows in (slice(2, 18), slice(22, 38)):
        for cols in (slice(2, 8), slice(12, 18)):
            assert np.abs(got[rows, cols].mean((0, 1)) - want[rows, cols].mean((0, 1))).max() < 12


# ---- bad files ---------------------------------------------------------------------------------


def _bomb_png(path, side: int) -> None:
    """A real 1-bit side x side PNG of zeros: tiny on disk, huge once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_bad_files_raise_bad_image(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image, just text\n")
    cases = {"truncated.png": "unreadable", "empty.jpg": "empty file", "text.png": "unreadable"}
    for name, reason in cases.items():
        with pytest.raises(BadImage) as err:
            load_image(tmp_path / name)
        assert err.value.reason.startswith(reason), (name, err.value.reason)
    assert load_image(tmp_path / "full.png").size == (64, 64)


def test_decompression_bomb_and_too_small(tmp_path):
    bomb, huge_bomb = tmp_path / "bomb.png", tmp_path / "huge_bomb.png"
    _bomb_png(bomb, 9000)  # 81 MP: under PIL's own guard, so only our max_pixels check can stop it
    _bomb_png(huge_bomb, 20000)  # 400 MP: above PIL's hard limit (2 x Image.MAX_IMAGE_PIXELS)
    assert bomb.stat().st_size < 100_000 and huge_bomb.stat().st_size < 100_000
    with pytest.raises(BadImage, match="decompression bomb: 9000x9000 exceeds max_pixels=10000000"):
        load_image(bomb, max_pixels=10_000_000)
    # a caller limit above PIL's: PIL's DecompressionBombError is reported the same way
    with pytest.raises(BadImage, match="decompression bomb: Image size"):
        load_image(huge_bomb, max_pixels=10**12)
    Image.new("RGB", (40, 20)).save(tmp_path / "small.png")
    with pytest.raises(BadImage, match="too small.*min_side=32"):
        load_image(tmp_path / "small.png", min_side=32)
    assert load_image(tmp_path / "small.png", min_side=20).size == (40, 20)


# ---- scanning ----------------------------------------------------------------------------------


def _touch_image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, format="PNG" if path.suffix.lower() != ".jpg" else "JPEG")


def test_scan_folder(tmp_path):
    for name in ("b.png", "sub/a.JPG", "sub/deeper/c.webp", "nocap.jpeg", ".hidden/x.png"):
        _touch_image(tmp_path / name)
    (tmp_path / "b.txt").write_text("Blue_Sky, cloud\n")
    (tmp_path / "sub/a.txt").write_text("girl, solo")
    (tmp_path / "sub/deeper/c.txt").write_text("")
    (tmp_path / "notes.md").write_text("not an image")
    records, problems = scan_source(tmp_path)
    assert records == [
        ImageRecord(tmp_path / "b.png", "Blue_Sky, cloud", "b.png"),
        ImageRecord(tmp_path / "nocap.jpeg", "", "nocap.jpeg"),
        ImageRecord(tmp_path / "sub/a.JPG", "girl, solo", "sub/a.JPG"),
        ImageRecord(tmp_path / "sub/deeper/c.webp", "", "sub/deeper/c.webp"),
    ]
    assert problems == [Problem("nocap.jpeg", tmp_path / "nocap.jpeg", MISSING_CAPTION),
                        Problem("notes.md", tmp_path / "notes.md", f"{UNSUPPORTED}; skipped")]
    assert ".bmp, .gif, .jpeg, .jpg, .png, .webp" in UNSUPPORTED


def test_gif_first_frame_and_bmp_are_read(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue])
    blue.save(tmp_path / "b.bmp")
    (tmp_path / "scan.tiff").write_bytes(b"II*\0")
    records, problems = scan_source(tmp_path)
    assert [r.key for r in records] == ["anim.gif", "b.bmp"]
    assert [(p.key, p.reason.split(":")[0]) for p in problems] == [
        ("anim.gif", MISSING_CAPTION), ("b.bmp", MISSING_CAPTION), ("scan.tiff", "unsupported format")]
    assert np.asarray(load_image(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]  # the first frame
    assert np.asarray(load_image(tmp_path / "b.bmp"))[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("raw, problem", [
    ("\ufeff1girl, café".encode(), None),  # UTF-8 with a BOM (Notepad): the BOM must not stick to "1girl"
    ("1girl, café".encode("utf-16"), None),  # UTF-16 with its BOM (the platform's byte order)
    (b"\xfe\xff" + "1girl, café".encode("utf-16-be"), None),  # big-endian
    ("1girl, cafe".encode("utf-16-le"), "caption holds NUL bytes"),  # no BOM: NULs reported and removed
])
def test_caption_codec_follows_the_byte_order_mark(tmp_path, raw, problem):
    _touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(raw)
    records, problems = scan_source(tmp_path)
    assert records[0].caption == ("1girl, cafe" if problem else "1girl, café")
    assert [p.reason.split(" (")[0] for p in problems] == ([problem] if problem else [])


def test_scan_manifest_refuses_escapes_and_reports(tmp_path):
    root = tmp_path / "data"
    for name in ("img/ok.png", "img/nocap.png", "img/dup.png"):
        _touch_image(root / name)
    _touch_image(tmp_path / "outside.png")
    lines = [
        {"image": "img/ok.png", "caption": "a, b"},
        {"image": "../outside.png", "caption": "escape"},
        {"image": "img/../../outside.png", "caption": "sneaky escape"},
        {"image": str(tmp_path / "outside.png"), "caption": "absolute"},
        {"image": "img/nocap.png"},
        {"image": "img/gone.png", "caption": "missing file"},
        {"image": "img/dup.png", "caption": "first"},
        {"image": "./img/dup.png", "caption": "second"},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n{not json\n\n"
    text += "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    (root / "train.jsonl").write_text(text)
    records, problems = scan_source(root / "train.jsonl")
    assert [(r.key, r.caption) for r in records] == [
        ("img/dup.png", "first"),
        ("img/nocap.png", ""),
        ("img/ok.png", "a, b"),
    ]
    assert records[2].path == root / "img/ok.png"
    assert problems == sorted(problems)
    assert [(p.key, p.reason.split(":")[0]) for p in problems] == [
        ("img/dup.png", "duplicate entry"),
        ("img/nocap.png", MISSING_CAPTION),
        ("train.jsonl:2", "refused path"),
        ("train.jsonl:3", "refused path"),
        ("train.jsonl:4", "bad manifest line"),
        ("train.jsonl:6", "refused path"),
        ("train.jsonl:8", "missing file"),
    ]
    assert "escapes the manifest folder" in problems[2].reason and "absolute" in problems[5].reason
    assert summarize_problems(problems) == {
        "bad manifest line": 1,
        "duplicate entry": 1,
        MISSING_CAPTION: 1,
        "missing file": 1,
        "refused path": 3,
    }


def test_manifest_bad_bytes_and_long_paths_are_reported_by_line(tmp_path):
    _touch_image(tmp_path / "ok.png")
    long_name = "x" * 300 + ".png"  # over NAME_MAX (255): stat() raises ENAMETOOLONG
    _touch_image(tmp_path / "esc.png")
    lines = [json.dumps({"image": "ok.png", "caption": "fine"}).encode(),
             b'{"image": "esc.png", "caption": "caf\\udce9, smile?"}',
             b'{"image": "ok2.png", "caption": "caf\xe9"}',
             json.dumps({"image": long_name, "caption": "long"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records, problems = scan_source(tmp_path / "m.jsonl")
    column = lines[2].index(0xE9) + 1
    assert [(r.key, r.caption) for r in records] == [("esc.png", "caf\ufffd, smile?"), ("ok.png", "fine")]
    assert [(p.key, p.reason) for p in problems] == [
        ("esc.png", "caption not UTF-8: lone surrogate escape, kept with U+FFFD in its place"),
        ("m.jsonl:3", f"not UTF-8: byte 0xe9 at column {column}"),
        ("m.jsonl:4", f"unusable path: File name too long: {long_name[:80]!r}..."),
    ]


def test_non_utf8_caption_is_kept_with_replacement_and_reported(tmp_path):
    _touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"1girl, caf\xe9, smile")
    records, problems = scan_source(tmp_path)
    assert [r.caption for r in records] == ["1girl, caf\ufffd, smile"]
    assert [p.reason for p in problems] == ["caption not UTF-8: byte 0xe9 at offset 10, kept with U+FFFD in "
                                            "its place"]


def test_file_names_that_are_not_utf8_are_skipped_and_reported(tmp_path):
    """A folder image named with a non-UTF-8 byte (it reaches Python as a surrogate escape) and a manifest
    key with a lone surrogate are reported with the fix: the index stores keys as UTF-8, they cannot be."""
    _touch_image(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    bad = os.fsdecode(b"bad\xff.png")
    _touch_image(tmp_path / bad)
    records, problems = scan_source(tmp_path)
    assert [r.key for r in records] == ["ok.png"]
    assert [(p.key, p.reason) for p in problems] == [
        (bad, "file name not UTF-8 (byte 0xff at 3): rename the file to UTF-8")]
    (tmp_path / "m.jsonl").write_bytes(b'{"image": "ok.png", "caption": "a"}\n'
                                       b'{"image": "b\\udcffd.png", "caption": "b"}\n')
    records, problems = scan_source(tmp_path / "m.jsonl")
    assert [r.key for r in records] == ["ok.png"]
    assert [(p.key, p.reason) for p in problems] == [
        ("m.jsonl:2", "file name not UTF-8 (byte 0xff at 1): rename the file to UTF-8")]


# ---- one rank's share -----------------------------------------------------------------------------


def _mixed_sources(root):
    """A folder tree (nested, hidden, missing captions) and the same images in a JSONL and a Parquet
    manifest with bad lines, refused paths, missing files and duplicates."""
    names = [f"d{i % 4}/sub{i % 3}/img{i:03d}.png" for i in range(40)] + ["top.png", "a.png", "a/b.png"]
    for i, name in enumerate(names):
        _touch_image(root / name)
        if i % 5:
            (root / name).with_suffix(".txt").write_text(f"tag{i % 7}, tag{i % 3}")
    _touch_image(root / ".hidden" / "x.png")
    lines = [json.dumps({"image": n, "caption": f"c{i}"}) for i, n in enumerate(names)]
    lines += ["{broken", json.dumps({"image": "../out.png"}), json.dumps({"image": "gone.png"}),
              json.dumps({"image": names[3], "caption": "again"}), json.dumps({"image": "top.png"})]
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    sources = [root, root / "m.jsonl"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return sources
    entries = [json.loads(line) for line in lines if line != "{broken"]
    pq.write_table(pa.table({"image": [e["image"] for e in entries],
                             "caption": [e.get("caption") for e in entries]}), root / "m.parquet")
    return sources + [root / "m.parquet"]


def test_shares_partition_the_scan(tmp_path):
    for source in _mixed_sources(tmp_path):
        whole = scan_share(source, 0, 1)
        assert (whole.records, whole.problems) == scan_source(source) and len(whole.records) == 43
        assert len(whole.problems) >= 5
        for world_size in (2, 3):
            shares = [scan_share(source, rank, world_size) for rank in range(world_size)]
            assert len({s.digest for s in shares}) == 1 and shares[0].digest == whole.digest
            for rank, share in enumerate(shares):
                assert all(in_share(r.key, rank, world_size) for r in share.records)
            assert all(len(s.records) > 0 for s in shares)  # every rank got some work
            records = sorted((r for s in shares for r in s.records), key=lambda r: r.key)
            problems = sorted(p for s in shares for p in s.problems)
            assert records == whole.records and problems == whole.problems, (source, world_size)


def test_share_digest_follows_the_source(tmp_path):
    _touch_image(tmp_path / "a.png")
    before = scan_share(tmp_path, 0, 2).digest
    _touch_image(tmp_path / "b.png")
    assert scan_share(tmp_path, 1, 2).digest != before
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        scan_share(tmp_path, 2, 2)


def test_manifest_with_a_byte_order_mark_reads_its_first_line(tmp_path):
    _touch_image(tmp_path / "a.png")
    line = json.dumps({"image": "a.png", "caption": "x"}).encode()
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + line)  # Notepad's UTF-8
    records, problems = scan_source(tmp_path / "m.jsonl")
    assert [(r.key, r.caption) for r in records] == [("a.png", "x")] and problems == []
