"""Role-suffix sets several trainers share: each is what one naming writes for one family.

A trainer module builds its rows' `suffixes` from these (kohya's own LoRA names, PEFT's, LyCORIS's
module files); a set only one trainer writes lives in that trainer's module.
"""

from __future__ import annotations

from .base import Spelling

# The tensor roles the algorithm modules read (algorithms/lokr.py, loha.py name them w1, w1_a, ...).
LOKR_ROLES = ("w1", "w1_a", "w1_b", "t1", "w2", "w2_a", "w2_b", "t2")
LOHA_ROLES = ("w1_a", "w1_b", "t1", "w2_a", "w2_b", "t2")

KOHYA_LORA = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"}
PEFT_LORA = {"down": ".lora_A.weight", "up": ".lora_B.weight"}
# LyCORIS's module files (lycoris/modules/lokr.py, loha.py, full.py), also kept by kohya, ComfyUI, ai-toolkit.
LYCORIS_ALGOS: Spelling = {
    "lokr": {r: ".lokr_" + r for r in LOKR_ROLES},
    "loha": {r: ".hada_" + r for r in LOHA_ROLES},
    "full": {"diff": ".diff", "diff_b": ".diff_b"},
}
# LyCORIS-only algorithms (lycoris/modules/glora.py, diag_oft.py, boft.py, ia3.py: the module's state dict;
# OFT's `.alpha` is its constraint, read through the scale's spelling, see Algorithm.alpha_role). ComfyUI's
# row spells OFT/BOFT only (convert writes them with the constraint applied: tools/targets.py).
LYCORIS_ONLY: Spelling = {
    "glora": {r: f".{r}.weight" for r in ("a1", "a2", "b1", "b2")},
    "oft": {"oft_blocks": ".oft_blocks", "rescale": ".rescale"},  # diag-oft (n, b, b) and BOFT (m, n, b, b)
    "ia3": {"weight": ".weight", "on_input": ".on_input"},
}
ALPHA = {"alpha": ".alpha"}
DORA_SCALE = {"dora_scale": ".dora_scale"}  # LyCORIS / ComfyUI: shape (out, 1), or (1, in) (OneTrainer)
PEFT_MAGNITUDE = {"magnitude": ".lora_magnitude_vector"}  # PEFT: one value per output row

KOHYA: Spelling = {"lora": KOHYA_LORA, **LYCORIS_ALGOS, **LYCORIS_ONLY, "scale": ALPHA, "dora": DORA_SCALE}
COMFY: Spelling = {"lora": PEFT_LORA, **LYCORIS_ALGOS, "oft": LYCORIS_ONLY["oft"], "scale": ALPHA, "dora": DORA_SCALE}
PEFT: Spelling = {"lora": PEFT_LORA, "dora": PEFT_MAGNITUDE}


def role_name(key: str) -> str:
    """The role segment of a key, as `inspect`'s evidence sees it: 'x.lora_A.default.weight' -> 'lora_A';
    'x.alpha' -> 'alpha'."""
    parts = key.split(".")
    parts = [p for p in parts[:-1] if p != "default"] + parts[-1:]
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


KOHYA_DOWN = role_name(KOHYA_LORA["down"])  # 'lora_down'
PEFT_DOWN = role_name(PEFT_LORA["down"])  # 'lora_A'
