"""What one trainer module declares (`TRAINER = Trainer(...)`): the records the registry collects.

A trainer's knowledge is of three kinds, and each kind has one field here:

- how it spells keys: its `Layout` rows (written and read), the prefixes it marks, spellings it
  writes that no row writes (read only), tensors it keeps that are not adapter weights;
- the evidence that names it in `inspect`: `Label` rules, each a test of the file's `Evidence` and
  the text it shows, tried in `order` across every trainer (lower first);
- its scale rule: where its alpha lives (`config_alpha`), a rule of its own for a module's scale
  (`module_scale`), and the notes `inspect` prints about it (`notes`).

The generic code reads the registry (`trainers/__init__.py`): `layouts/tables.py` (rows, prefixes),
`formats/grammar.py` (spellings), `formats/writers.py` (labels) and `keys/scales.py` (scales).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .scale import AlphaFrom, Scale

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group

#: family -> role -> suffix. Families: the algorithms (lora, lokr, loha, full), "scale" (alpha) and
#: "dora" (a DoRA magnitude beside LoRA factors).
Spelling = Mapping[str, Mapping[str, str]]
#: family -> role -> every spelling files carry that no row writes.
ReadOnly = Mapping[str, Mapping[str, tuple[str, ...]]]


@dataclass(frozen=True)
class Layout:
    """One trainer's key naming. `alpha` says where alpha is stored:
    "key" (a `.alpha` tensor per module), "metadata" (diffusers' `lora_adapter_metadata`), "config"
    (a PEFT folder's adapter_config.json), "folded" (sqrt(alpha / rank) multiplied into both LoRA
    factors, no alpha kept) or "none" (the file means scale 1)."""

    name: str
    writer: str  # who writes it: the saving code, for provenance
    prefix: str
    suffixes: Spelling
    alpha: str = "key"
    flat: bool = False  # module dots as underscores (kohya): 'layers_0_attention_to_q'
    native: bool = False  # original / ComfyUI module names: to_out.0 -> out, norm_q -> q_norm
    fused_qkv: bool = False  # q, k, v written as one native attention.qkv where exact
    adapter_name: str = ""  # PEFT adapter segment before '.weight' ('default': '.lora_A.default.weight')
    folder: bool = False  # a PEFT folder: adapter_model.safetensors + adapter_config.json
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(f for f in self.suffixes if f not in ("scale", "dora"))


@dataclass(frozen=True)
class Evidence:
    """What a file shows about its writer, computed once per file by `formats/writers.py`."""

    prefixes: frozenset[str]  # the transformer prefixes its groups carry
    stems: tuple[str, ...]  # module stems after the prefix
    algorithms: frozenset[str]
    roles: frozenset[str]  # role names of its keys: 'lora_A', 'lora_down', 'alpha', ...
    alphas: bool  # some module has a per-module alpha
    fused: bool  # some stem is a fused qkv / native 'out' name
    split: bool  # some stem is a split q/k/v/out name
    meta: Mapping[str, str]
    tensor_keys: tuple[str, ...]
    namings: frozenset[str]  # whose naming the prefixes are in ("kohya", "comfy", ...: `Trainer.prefixes`)


class Label(NamedTuple):
    """An `inspect` label: the first rule, by `order` over every trainer, that returns text names the file."""

    order: int
    rule: Callable[[Evidence], str | None]


class ConfigAlpha(NamedTuple):
    """A file-wide alpha for one LoRA module without a `.alpha` key: the value, where it lives, rsLoRA,
    and a file-wide alpha that exists but does not describe this module (reported, not applied)."""

    alpha: float | None
    source: AlphaFrom
    rslora: bool = False
    ignored: AlphaFrom | None = None


class Note(NamedTuple):
    """Notes `inspect` prints about the scales of a file, in `order` over every trainer (generic notes: 0, 50)."""

    order: int
    notes: Callable[[AdapterFile, list[tuple[Group, Scale]]], list[str]]


ModuleScale = Callable[["AdapterFile", "Group", Mapping[str, tuple[int, ...]]], Scale | None]


@dataclass(frozen=True)
class Trainer:
    """One trainer (or family of files): everything the library knows about it."""

    name: str
    layouts: tuple[Layout, ...] = ()
    prefixes: Mapping[str, str] = field(default_factory=dict)  # prefix -> whose naming follows it
    text_encoder_prefixes: tuple[str, ...] = ()
    read_only: ReadOnly = field(default_factory=dict)
    companions: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (family, role) -> role beside it
    adapter_names: tuple[str, ...] = ()  # adapter-name key segments the reader strips ('default')
    unsupported: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # suffix -> (algorithm, form)
    trainer_data: Mapping[str, str] = field(default_factory=dict)  # tensor key -> what it is (not weights)
    labels: tuple[Label, ...] = ()
    config_alpha: Callable[[AdapterFile, Group], ConfigAlpha | None] | None = None
    module_scale: ModuleScale | None = None
    notes: tuple[Note, ...] = ()
