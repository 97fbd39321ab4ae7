"""Key layouts: how each trainer spells an adapter file's keys, one table used to read and to write.

A key is `prefix + module name + role suffix`: `lora_unet_layers_0_attention_to_q.lora_down.weight`
is the kohya prefix, the module `layers.0.attention.to_q` with dots as underscores, and the LoRA
`down` role. `tables.py` holds that knowledge as data, collected from the trainer modules (`zimage_lora/trainers/`,
one per trainer: its rows, prefixes, evidence and scale rule together):

- `LAYOUTS`: one `Layout` row per trainer naming (kohya / musubi-tuner, LyCORIS, ComfyUI, ai-toolkit,
  diffusers, PEFT, DiffSynth, OneTrainer, VideoX-Fun, ...): its prefix, how it spells module names
  (`flat`, `native`, `fused_qkv`, `adapter_name`), the suffix of each role per family
  (`suffixes`), where alpha lives (`alpha`) and the metadata it writes;
- `PREFIXES`, `READ_ONLY_SUFFIXES`, `TEXT_ENCODER_PREFIXES`, `TRAINER_DATA`, `UNSUPPORTED_SUFFIXES`:
  what files carry beyond the rows (spellings read but never written, keys reported, not applied).

Reading: `formats/grammar.py` turns these tables into its lookup dicts once at import (a key's last
segments are looked up, so a 200,000-key header stays linear). Writing: `write.state_dict` /
`write.save` spell `Item`s (one module's adapter, diffusers names) in a row's layout; `convert` and
the demo's example files (`zimage_lora.examples`) both write through it.

To add a layout: add a `Layout` row to its trainer's module in `zimage_lora/trainers/` (or a new
module ending in `TRAINER = Trainer(...)`), reusing a suffix set of `trainers/spelling.py` such as
`KOHYA` or `PEFT`; a new prefix goes in that trainer's `prefixes`, and a label `inspect` should show
in its `labels` (a `Label` rule over the file's `Evidence`). The reader then reads it, and
`write.save(items, "<name>", path)` writes it.

To add an algorithm's rows (once its module exists in `algorithms/`): add its family to
`trainers/spelling.LYCORIS_ALGOS` with the role -> suffix of each tensor as LyCORIS saves it, e.g. GLoRA
`"glora": {r: f".{r}.weight" for r in ("a1", "a2", "b1", "b2")}`, OFT `"oft": {"oft_blocks":
".oft_blocks"}`, IA3 `"ia3": {"weight": ".weight", "on_input": ".on_input"}` (`.weight` alone
would match any module weight: an IA3 row needs `on_input` beside it, which is a reader rule, not a
spelling), and remove its suffixes from the trainer's `unsupported`. Every layout that spreads
`LYCORIS_ALGOS` (kohya, LyCORIS, ComfyUI, ai-toolkit's LyCORIS port) then reads and writes it.
"""

from __future__ import annotations

from .item import Item
from .tables import LAYOUTS, PREFIXES, Layout

__all__ = ["Item", "LAYOUTS", "Layout", "PREFIXES"]
