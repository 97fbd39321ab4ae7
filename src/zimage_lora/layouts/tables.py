"""The layout tables: how each trainer spells an adapter's keys, as data.

A key is prefix + module name + role suffix. `Layout` rows say which prefix a trainer writes, how it
spells module names (dots or underscores, diffusers or native names, q/k/v split or fused) and the
suffix of every tensor role per algorithm family. The reader (`formats/grammar.py`) builds its
lookup tables from the same rows, plus the spellings below that files carry but no row here writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: family -> role -> suffix. Families: the algorithms (lora, lokr, loha, full), "scale" (alpha) and
#: "dora" (a DoRA magnitude beside LoRA factors).
Spelling = Mapping[str, Mapping[str, str]]

# The tensor roles the algorithm modules read (algorithms/lokr.py, loha.py name them w1, w1_a, ...).
LOKR_ROLES = ("w1", "w1_a", "w1_b", "t1", "w2", "w2_a", "w2_b", "t2")
LOHA_ROLES = ("w1_a", "w1_b", "t1", "w2_a", "w2_b", "t2")

# -- suffix sets: each is what one naming writes for one family -------------------------------------
KOHYA_LORA = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"}
PEFT_LORA = {"down": ".lora_A.weight", "up": ".lora_B.weight"}
DOTTED_LORA = {"down": ".lora.down.weight", "up": ".lora.up.weight", "mid": ".lora.mid.weight"}  # Anime-Z (F11)
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

# Spellings files carry that no row writes: read, never written (several per role).
READ_ONLY_SUFFIXES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "lora": {
        # diffusers' old attention-processor LoRA (LoRALinearLayer) and to_q_lora.down.weight spellings,
        # and trainers that drop '.weight'.
        "down": (".lora_linear_layer.down.weight", "_lora.down.weight", ".lora_A", ".lora_down"),
        "up": (".lora_linear_layer.up.weight", "_lora.up.weight", ".lora_B", ".lora_up"),
        "mid": (".lora_mid",),
    },
    "scale": {"alpha": (".lora_alpha",)},
    "dora": {"magnitude": (".lora_magnitude_vector.weight",)},
    # PEFT OFT v2 (OFTConfig save_pretrained) and OneTrainer OFT_2 (its scaled-OFT marker buffer):
    # algorithms/oft_input.py. Read only: no layout row writes them (convert refuses with the reason).
    "oft_r": {"oft_R": (".oft_R.weight",), "scaled": (".oft_R.scaled_oft",)},
    "boft_r": {"boft_R": (".boft_R",), "boft_s": (".boft_s",)},  # PEFT BOFTConfig: algorithms/boft_input.py
}

# (family, role) -> a role of the same family it needs beside it: a suffix as short as '.weight' would
# match any module weight, so it counts only where its companion sits on the same module; alone it is
# reported as a key without an adapter suffix (formats/reader.py).
COMPANIONS: dict[tuple[str, str], str] = {("ia3", "weight"): "on_input"}  # LyCORIS IA3: `.weight` + `.on_input`

# PEFT puts the adapter's name in the key ('.lora_A.default.weight'); the reader strips these names.
PEFT_ADAPTER_NAMES = ("default", "default_0")

# Forms other trainers write that this library does not apply yet: suffix -> (algorithm, the form and
# its writer). A key is reported with the form, never with a list of supported algorithms that
# contains the name. Adding one moves its suffixes from here into a family of the spellings above.
_PEFT_OFT_V1 = "OFT v1 of PEFT before 0.14 ('oft_r' full blocks with 'oft_s')"
_PEFT_IA3 = "IA3 in PEFT's form (IA3Config 'ia3_l'; LyCORIS's '.weight' + '.on_input' is supported)"
_VERA = "VeRA (PEFT VeraConfig: its shared random projections are not in the file)"
UNSUPPORTED_FORMS: dict[str, tuple[str, str]] = {
    ".oft_diag": ("OFT", "OFT in the 'oft_diag' form (a spelling of no trainer this library knows)"),
    ".oft_r": ("OFT", _PEFT_OFT_V1), ".oft_s": ("OFT", _PEFT_OFT_V1),
    ".weight_ia3": ("IA3", _PEFT_IA3), ".ia3_l": ("IA3", _PEFT_IA3),
    ".lora_E": ("AdaLoRA", "AdaLoRA (PEFT AdaLoraConfig: 'lora_E' singular values)"),
    ".vera_lambda_b": ("VeRA", _VERA), ".vera_lambda_d": ("VeRA", _VERA),
}
UNSUPPORTED_SUFFIXES = {suffix: name for suffix, (name, _form) in UNSUPPORTED_FORMS.items()}

# -- prefixes: each one says whose naming the rest of the key is in -----------------------------------
# The reader strips the first that matches: a prefix comes before any shorter one it starts with.
PREFIXES: dict[str, str] = {
    "base_model.model.transformer.": "peft",  # PEFT around a whole pipeline
    "base_model.model.": "peft",
    "model.diffusion_model.": "comfy",  # a full ComfyUI checkpoint's state-dict names
    "diffusion_model.": "comfy",
    "transformer.": "diffusers",
    "lora_unet__": "kohya",  # VideoX-Fun: "lora_unet" + "." + "" + "." + module, then '.' -> '_'
    "lora_unet_": "kohya",
    "lora_transformer_": "kohya",
    "lycoris_": "lycoris",
    "unet.": "diffusers",
}

# Tensors trainers keep in adapter files that are not adapter weights (reported as ignored).
TRAINER_DATA: dict[str, str] = {
    "lokr_factor": "musubi-tuner LoKr factor (networks/lokr.py network buffer)",
}

# Prefixes of text-encoder keys: reported, never applied to the transformer. kohya's (sd-scripts,
# musubi-tuner) and LyCORIS's name the writer in inspect (formats/text_encoder.py).
KOHYA_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_te_")
TEXT_ENCODER_PREFIXES = (
    *KOHYA_TEXT_ENCODER_PREFIXES, "text_encoder.", "text_encoder_2.",
    "text_encoders.", "te.", "te1.", "te2.", "cond_stage_model.", "conditioner.", "text_model.",
    "base_model.model.text_model.", "qwen3.", "lora_qwen",
)

# Metadata keys that name the program that wrote a file (formats/writers.py reads them).
ONETRAINER_MARKS = ("ot_revision", "ot_branch")  # DtypeModelSaverMixin._create_safetensors_header
MFLUX_MARKS = ("mflux_version",)  # ZImageTrainingAdapter.save_lora_adapter
# musubi-tuner's --network_module values for Z-Image (kohya sd-scripts uses networks.lora, lycoris.kohya).
MUSUBI_MODULES = ("networks.lora_zimage", "networks.lokr", "networks.loha")


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


def _rows(*layouts: Layout) -> dict[str, Layout]:
    return {x.name: x for x in layouts}


LAYOUTS: dict[str, Layout] = _rows(
    Layout("kohya", "kohya-ss sd-scripts / musubi-tuner networks/lora_zimage.py (LoRANetwork, 'lora_unet')",
           "lora_unet_", KOHYA, flat=True),
    Layout("kohya-fused", "musubi-tuner networks/convert_z_image_lora_to_comfy.py (q/k/v fused, alpha x3)",
           "lora_unet_", KOHYA, flat=True, native=True, fused_qkv=True),
    Layout("kohya-dotted", "Anime-Z style files (F11): kohya names, '.lora.down.weight'",
           "lora_unet_", {"lora": DOTTED_LORA, "scale": ALPHA}, flat=True),
    Layout("videox-fun", "VideoX-Fun videox_fun/utils/lora_utils.py LoRANetwork ('lora_unet' + '.' + '')",
           "lora_unet__", KOHYA, flat=True),
    Layout("lycoris", "LyCORIS LycorisNetwork (prefix 'lycoris')", "lycoris_", KOHYA, flat=True,
           metadata={"ss_network_module": "lycoris.kohya"}),
    Layout("comfy", "ComfyUI native names, fused qkv (training / extract nodes, Civitai F9)",
           "diffusion_model.", COMFY, native=True, fused_qkv=True),
    Layout("ai-toolkit", "ostris/ai-toolkit ToolkitNetworkMixin.save_weights (LoRA: no alpha)",
           "diffusion_model.", {"lora": PEFT_LORA}, alpha="none"),
    # The metadata each trainer writes is the evidence `inspect` names it by (formats/writers.py):
    # ai-toolkit's 'software' (ToolkitNetworkMixin.save_weights), the 'ss_network_module' musubi-tuner's
    # converter copies from its source (a musubi LoRA).
    Layout("ai-toolkit-lycoris", "ai-toolkit toolkit/models/lokr.py (LyCORIS port: alpha kept)",
           "diffusion_model.", {**LYCORIS_ALGOS, "scale": ALPHA}, metadata={"software": '{"name": "ai-toolkit"}'}),
    # The tool also turns every '_' of the module name into '.' ('attention.to.q'); the row writes the
    # diffusers names, which read the same.
    Layout("musubi-other", "musubi-tuner convert_lora.py --target other (sqrt(alpha / rank) in each factor)",
           "diffusion_model.", {"lora": PEFT_LORA}, alpha="folded",
           metadata={"ss_network_module": "networks.lora_zimage"}),
    Layout("diffsynth", "DiffSynth-Studio (PEFT state dict without the pipeline prefix)",
           "", {"lora": PEFT_LORA}, alpha="none", adapter_name="default"),
    Layout("onetrainer-legacy", "OneTrainer ZImageLoRASaver._convert_legacy",
           "transformer.", {"lora": KOHYA_LORA, "scale": ALPHA}),
    Layout("onetrainer-original", "OneTrainer LoRASaverMixin._save_original",
           "", {"lora": PEFT_LORA, "scale": ALPHA}),
    Layout("onetrainer-comfy", "OneTrainer LoRASaverMixin._save_comfy",
           "diffusion_model.", {"lora": PEFT_LORA, "scale": ALPHA, "dora": DORA_SCALE}),
    Layout("diffusers", "diffusers save_lora_weights (alpha in lora_adapter_metadata)",
           "transformer.", PEFT, alpha="metadata", metadata={"format": "pt"}),
    Layout("peft", "PEFT save_pretrained (a folder with adapter_config.json)",
           "base_model.model.", PEFT, alpha="config", folder=True),
)
