"""What a file's writer decided that changes numbers: one typed `TrainerMeta` per file.

Keys and metadata name the writer (`formats/writers.py`); this module asks the trainers that own each
number-changing fact (`trainers/<name>.py`) to read it from the same evidence, as types, so that the
text `inspect` prints can be reworded without changing a scale: where a config alpha lives (a PEFT
config, diffusers' metadata, kohya's `ss_network_alpha`), which of musubi-tuner's two LoKr rules the
file follows, whose OFT constraint applies (ComfyUI's or LyCORIS's), and how a PEFT-style OFT
rotation is built (Cayley-Neumann terms, OneTrainer's scaled OFT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..trainers import diffusers, kohya
from ..trainers.comfyui import OFTConstraint, oft_constraint
from ..trainers.musubi import MusubiLoKr, musubi_lokr
from ..trainers.peft import PeftConfig
from ..trainers.scale import ConfigSource
from .safetensors_file import Header

__all__ = ["ConfigSource", "MusubiLoKr", "OFTConstraint", "PeftConfig", "TrainerMeta", "musubi_lokr", "trainer_meta"]


@dataclass(frozen=True)
class TrainerMeta:
    """The number-changing facts of one file, from its keys, metadata and config."""

    peft: PeftConfig | None = None
    kohya_alpha: float | None = None  # metadata 'ss_network_alpha', finite
    musubi_lokr: MusubiLoKr | None = None  # a file of musubi-tuner's own networks/lokr.py
    oft_constraint: OFTConstraint = OFTConstraint.LYCORIS
    # A file-wide scaled-OFT marker (OneTrainer's `oft_R.scaled_oft` buffer) is read per module.


def trainer_meta(header: Header, config: Mapping[str, object] | None, component: str,
                 comfy_native: bool) -> TrainerMeta:
    """`config`: a PEFT folder's adapter_config.json; otherwise the file's own metadata is read.
    `comfy_native`: the keys are ComfyUI's own names (its train node, its loader's convention)."""
    meta = header.metadata
    peft: PeftConfig | None = None
    kohya_alpha: float | None = None
    if config is not None:
        peft = PeftConfig(ConfigSource.PEFT_CONFIG, dict(config))
    else:
        peft = diffusers.metadata_config(header, component)
        if peft is None:
            kohya_alpha = kohya.network_alpha(header)
    return TrainerMeta(peft=peft, kohya_alpha=kohya_alpha, musubi_lokr=musubi_lokr(meta, header.tensors.keys()),
                       oft_constraint=oft_constraint(meta, comfy_native))
