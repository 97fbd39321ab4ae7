"""What a file's writer decided that changes numbers: one typed `TrainerMeta` per file.

Keys and metadata name the writer (`formats/writers.py`); this module turns the same evidence into
the few facts the math depends on, as types, so that the text `inspect` prints can be reworded
without changing a scale: where a config alpha lives (a PEFT config, diffusers' metadata, kohya's
`ss_network_alpha`), which of musubi-tuner's two LoKr rules the file follows, whose OFT constraint
applies (ComfyUI's or LyCORIS's), and how a PEFT-style OFT rotation is built (Cayley-Neumann terms,
OneTrainer's scaled OFT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from ..errors import InvalidFormatError
from .safetensors_file import Header
from .untrusted import parse_json


class ConfigSource(Enum):
    """Where a PEFT-style config (lora_alpha, alpha_pattern, use_rslora, OFT options) came from."""

    PEFT_CONFIG = "adapter_config.json"
    DIFFUSERS_METADATA = "metadata 'lora_adapter_metadata'"


class MusubiLoKr(Enum):
    """musubi-tuner's networks/lokr.py has had two scale rules; the file says which wrote it.

    FIRST: commit 0b2d692 (#900): a full `lokr_w2` forces alpha = lora_dim, so its scale is 1
    (`merge_weights_to_tensor`: full matrix mode, scale 1.0); a low-rank w2: alpha / w2_a.shape[1].
    FACTOR: the rewrite that saves the network's `lokr_factor` buffer (and `ss_lokr_factor`
    metadata): alpha / dim with dim = w2_a.shape[1], or max(lokr_w2.shape) for a full w2.
    """

    FIRST = "0b2d692"
    FACTOR = "lokr_factor"


class OFTConstraint(Enum):
    """The norm bound on OFT's/BOFT's skew blocks Q that a file's `.alpha` means.

    LYCORIS: ||Q||_F <= alpha * out (DiagOFTModule / ButterflyOFTModule.__init__).
    COMFYUI: ||Q||_F <= alpha (comfy/weight_adapter/oft.py and boft.py at 3cd7b32: `constraint = alpha`,
    and its train node saves alpha 1.0).
    """

    LYCORIS = "lycoris"
    COMFYUI = "comfyui"


@dataclass(frozen=True)
class PeftConfig:
    """A PEFT config the file came with: the LoRA alpha rules and, for OFT, how R is built."""

    source: ConfigSource
    values: Mapping[str, object] = field(default_factory=dict)

    def get(self, key: str, default: object = None) -> object:
        return self.values.get(key, default)

    def unsupported_oft_form(self) -> str | None:
        """The PEFT OFTConfig options this library does not apply (algorithms/oft_input.py builds R by
        the 5-term Cayley-Neumann series, PEFT's and OneTrainer's default), named for the message."""
        if str(self.get("peft_type", "")).upper() != "OFT":
            return None
        odd = []
        if self.get("use_cayley_neumann", True) is False:
            odd.append("use_cayley_neumann=false (exact Cayley transform)")
        elif self.get("num_cayley_neumann_terms", 5) != 5:
            odd.append(f"num_cayley_neumann_terms={self.get('num_cayley_neumann_terms')!r} (5 is supported)")
        if self.get("coft", False):
            odd.append("coft=true (constrained OFT projects the rotations on every forward)")
        if not odd:
            return None
        return f"PEFT OFTConfig with {', '.join(odd)}, from {self.source.value}"


@dataclass(frozen=True)
class TrainerMeta:
    """The number-changing facts of one file, from its keys, metadata and config."""

    peft: PeftConfig | None = None
    kohya_alpha: float | None = None  # metadata 'ss_network_alpha', finite
    musubi_lokr: MusubiLoKr | None = None  # a file of musubi-tuner's own networks/lokr.py
    oft_constraint: OFTConstraint = OFTConstraint.LYCORIS
    # A file-wide scaled-OFT marker (OneTrainer's `oft_R.scaled_oft` buffer) is read per module.


def trainer_meta(
    header: Header, config: Mapping[str, object] | None, component: str, comfy_native: bool
) -> TrainerMeta:
    """`config`: a PEFT folder's adapter_config.json; otherwise the file's own metadata is read.
    `comfy_native`: the keys are ComfyUI's own names (its train node, its loader's convention)."""
    meta = header.metadata
    peft: PeftConfig | None = None
    kohya: float | None = None
    if config is not None:
        peft = PeftConfig(ConfigSource.PEFT_CONFIG, dict(config))
    else:
        peft = _diffusers_metadata(header, component)
        if peft is None:
            kohya = _kohya_alpha(header)
    constraint = OFTConstraint.COMFYUI if comfy_native and not _lycoris_metadata(meta) else OFTConstraint.LYCORIS
    return TrainerMeta(peft=peft, kohya_alpha=kohya, musubi_lokr=musubi_lokr(meta, header.tensors.keys()),
                       oft_constraint=constraint)


def musubi_lokr(meta: Mapping[str, str], tensor_keys: Iterable[str]) -> MusubiLoKr | None:
    """Which musubi-tuner LoKr wrote the file, or None (LyCORIS or another LoKr writer).

    The rewrite persists `lokr_factor` (a top-level buffer) and `ss_lokr_factor` (metadata); 0b2d692
    saves neither and names its module `networks.lokr` in `ss_network_module`."""
    if "lokr_factor" in tensor_keys or "ss_lokr_factor" in meta:
        return MusubiLoKr.FACTOR
    module = meta.get("ss_network_module", "")
    if module.endswith(".lokr") and "lycoris" not in module:
        return MusubiLoKr.FIRST
    return None


def _lycoris_metadata(meta: Mapping[str, str]) -> bool:
    """A LyCORIS-based trainer named in the metadata (LyCORIS's own network module, or ai-toolkit,
    whose toolkit/models are LyCORIS ports): its OFT bound is LyCORIS's, whatever the key prefix."""
    return "lycoris" in meta.get("ss_network_module", "") or '"ai-toolkit"' in meta.get("software", "")


def _diffusers_metadata(header: Header, component: str) -> PeftConfig | None:
    """diffusers' `lora_adapter_metadata` (PEFT-config JSON), possibly nested per component."""
    text = header.metadata.get("lora_adapter_metadata")
    if not text:
        return None
    doc = parse_json(text, header.path, what="metadata 'lora_adapter_metadata'", fix="Re-save the adapter.")
    # diffusers may nest per component: {"transformer": {...}} or prefix keys "transformer.r"
    if isinstance(doc, dict) and isinstance(doc.get(component), dict):
        doc = doc[component]
    if not isinstance(doc, dict):
        return None
    return PeftConfig(ConfigSource.DIFFUSERS_METADATA, {k.removeprefix(component + "."): v for k, v in doc.items()})


def _kohya_alpha(header: Header) -> float | None:
    raw = header.metadata.get("ss_network_alpha")
    if raw is None:
        return None
    try:
        alpha = float(raw)
    except ValueError:
        return None
    if not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{header.path}: metadata 'ss_network_alpha' is {raw!r}; expected a finite "
            "number. Fix the metadata or add per-module '.alpha' tensors."
        )
    return alpha
