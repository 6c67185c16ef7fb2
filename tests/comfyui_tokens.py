"""Run inside a ComfyUI checkout's Python: ComfyUI's SDXL tokenizer ids of some prompts, as JSON.

    COMFYUI_PYTHON comfyui_tokens.py COMFYUI_DIR PROMPTS_JSON OUT.json   (tests/test_single_file.py)
"""

from __future__ import annotations

import json
import sys

comfy_dir, prompts, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, comfy_dir)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.sdxl_clip  # noqa: E402

tokenizer = comfy.sdxl_clip.SDXLTokenizer()
ids = {}
for prompt in prompts:
    tokens = tokenizer.tokenize_with_weights(prompt)  # {"l": [[(id, weight), ...] per 77], "g": ...}
    ids[prompt] = {key: [t[0] for t in tokens[key][0]] for key in ("l", "g")}
with open(out_path, "w") as f:
    json.dump(ids, f)
