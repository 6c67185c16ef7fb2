"""The docs hold: a short README, links that resolve, a current config reference, commands that run.

Every command in a fenced ``bash`` block of README.md and docs/*.md is checked: a launch script's
arguments are parsed by that script's own parser (so a renamed or misspelt flag fails here), the cheap
ones that use the demo paths (``--help``, ``--print_config``) run as written, and every other command
is in NOT_RUN with the reason it is not run.
"""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 8 * 1024

NOT_RUN = {
    r"^make demo$": "4 minutes of CPU; tests/test_demo.py checks its parts (VAE, data, the fp32 engine)",
    r"^make test\b": "the test suite itself",
    r"^python -m venv ": "creates a virtual environment and downloads torch (no network here)",
    r"^COMFYUI_DIR=": "needs a ComfyUI checkout; it is tests/test_comfyui.py with ComfyUI's location",
    r"^python -m deepspeed\.checkpoint\.ds_to_universal ": "the trainer runs it itself on a world-size "
                                                          "change (checkpoint.to_universal); <tag> is a "
                                                          "placeholder",
}
"""Commands not run or parsed, and why (each reason must still match a command in the docs)."""
READER_FILES = {"my.yaml": "configs/demo.yaml"}
"""Files the reader makes (a copy of the demo config): parsed with the file they copy."""
RUN_FLAGS = ("--help", "--print_config")
"""Commands with one of these are cheap: they run as written (from the repository root)."""


def parsers() -> dict[str, object]:
    """Each launch script's own argument parsing, by script name."""
    from ztsnr_ds.config import build_parser
    from ztsnr_ds.vae_config import build_parser as vae_parser

    def load(name: str) -> dict:
        return runpy.run_path(str(ROOT / "launch" / name))

    return {
        "train.py": lambda argv: build_parser().parse_args(argv),
        "cache.py": lambda argv: load("cache.py")["cli_parser"]().parse_args(argv),
        "export.py": lambda argv: load("export.py")["build_parser"]().parse_args(argv),
        "sample.py": lambda argv: load("sample.py")["build_parser"]().parse_args(argv),
        "posthoc_ema.py": lambda argv: load("posthoc_ema.py")["build_parser"]().parse_args(argv),
        "gpu_check.py": lambda argv: load("gpu_check.py")["parse_args"](argv),
        "extract_lora.py": lambda argv: load("extract_lora.py")["build_parser"]().parse_args(argv),
        "train_vae.py": lambda argv: vae_parser().parse_args(argv),
    }


def commands() -> list[tuple[str, str]]:
    """(page name, command) for every command line of every fenced bash block (continuations joined,
    comments dropped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if tokens := shlex.split(line, comments=True):
                    found.append((page.name, shlex.join(tokens)))
    return found


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                missing.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                if anchor not in anchors:
                    missing.append(f"{page.name}: {target} (no such heading)")
    assert not missing, "links that do not resolve:\n" + "\n".join(missing)


def test_config_reference_is_current():
    reference = runpy.run_path(str(ROOT / "launch" / "config_reference.py"))
    assert reference["render"]() == (ROOT / "docs" / "config-reference.md").read_text(), (
        "docs/config-reference.md is stale: run python launch/config_reference.py")


def test_every_command_in_the_docs_parses_runs_or_says_why_not(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launch scripts set it at import on a CPU-only machine
    parse = parsers()
    reasons_used, ran = set(), []
    for page, command in commands():
        if reason := next((r for r in NOT_RUN if re.search(r, command)), None):
            reasons_used.add(reason)
            continue
        tokens = shlex.split(command)
        script = next((t for t in tokens if t.startswith("launch/") and t.endswith(".py")), None)
        assert script is not None, f"{page}: `{command}` is neither a launch script nor in NOT_RUN"
        argv = [READER_FILES.get(t, t) for t in tokens[tokens.index(script) + 1:]]
        if any(flag in argv for flag in RUN_FLAGS):
            result = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True)
            assert result.returncode == 0, f"{page}: `{command}` failed:\n{result.stderr[-2000:]}"
            ran.append(command)
            continue
        try:
            parse[Path(script).name](argv)
        except SystemExit as err:  # argparse's exit on a bad flag
            pytest.fail(f"{page}: `{command}`: {script} refuses these arguments (exit {err.code})")
    assert set(NOT_RUN) == reasons_used, f"stale NOT_RUN entries: {set(NOT_RUN) - reasons_used}"
    assert "python launch/train.py --help" in ran


def test_every_option_of_the_launch_scripts_has_help(monkeypatch):
    """`--help` explains every option: train.py's from the config fields' docstrings, the others' help=."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from ztsnr_ds.config import build_parser

    scripts = {"cache.py": "cli_parser", "export.py": "build_parser", "sample.py": "build_parser",
               "posthoc_ema.py": "build_parser"}
    parsers = {name: runpy.run_path(str(ROOT / "launch" / name))[fn]() for name, fn in scripts.items()}
    parsers["train.py"] = build_parser()
    silent = {name: [a.dest for a in p._actions if not a.help and not a.dest.endswith("help")]
              for name, p in parsers.items()}
    assert silent == {name: [] for name in parsers}
