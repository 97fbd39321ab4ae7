"""Text-to-image with diffusers' Z-Image pipelines and our adapters (dynamic or merged), optionally on
a torchao-quantized transformer, offline from the Hugging Face cache when the model is there."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..apply.pipeline import PIPELINE_CLASSES
from ..errors import DownloadError, InvalidFormatError, LoRAError, UnsupportedError
from ..sources import LoRAConfiguration
from .specs import parse_lora_spec

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("int8", "float8", "int4")


@dataclass
class GenerateResult:
    out: Path
    seconds: float
    adapters: list = field(default_factory=list)  # the engine's ApplyReports


def load_pipeline(model: str | Path, dtype: torch.dtype):
    """The folder's Z-Image pipeline (any class, from its model_index.json), from the local cache first;
    online only when that fails."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as local_exc:
        if Path(str(model)).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise DownloadError(
                f"{model}: cannot load the pipeline from disk or the Hugging Face cache ({local_exc}). "
                "Pass a diffusers pipeline folder, or download it once while online (`hf download "
                f"{model}`)."
            ) from None
        try:
            pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise DownloadError(
                f"{model}: not in the Hugging Face cache and the download failed ({exc}). "
                "Check the id and the network, or pass a local pipeline folder."
            ) from None
    if type(pipe).__name__ not in PIPELINE_CLASSES:
        raise UnsupportedError(
            f"{model}: a {type(pipe).__name__}, not a Z-Image pipeline; expected one of {', '.join(PIPELINE_CLASSES)}."
        )
    return pipe


def text_to_image(pipe):
    """A pipeline that draws from a prompt alone, sharing `pipe`'s modules (and so its adapters):
    `pipe` itself for ZImagePipeline and Omni (no image given), a ZImagePipeline view of the image-
    and control-conditioned ones."""
    from diffusers import ZImagePipeline

    if type(pipe).__name__ in ("ZImagePipeline", "ZImageOmniPipeline"):
        return pipe
    return ZImagePipeline.from_pipe(pipe)


def quantize_transformer(transformer: torch.nn.Module, kind: str) -> None:
    """torchao weight-only quantization of every Linear (the engine handles these layers in both modes)."""
    if kind not in QUANTIZE:
        raise InvalidFormatError(f"unknown --quantize {kind!r}; choose one of {', '.join(QUANTIZE)}.")
    try:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )
    except ImportError:
        raise UnsupportedError("--quantize needs torchao: pip install 'zimage-lora[quant]'.") from None
    configs = {
        "int8": Int8WeightOnlyConfig,
        "float8": Float8WeightOnlyConfig,
        "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    }
    try:
        quantize_(transformer, configs[kind]())
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        raise UnsupportedError(f"--quantize {kind} is not supported on this platform ({exc}).") from None


def _names(specs: list[LoRAConfiguration]) -> list[str | None]:
    """Attach names: None (the engine's default) unless two sources share a file stem."""
    stems = [s.name or Path(str(s.source)).stem for s in specs]
    names: list[str | None] = []
    for i, (spec, stem) in enumerate(zip(specs, stems, strict=True)):
        names.append(spec.name or (f"{stem}_{i}" if stems.count(stem) > 1 else None))
    return names


def generate(
    prompt: str,
    loras: Sequence[LoRAConfiguration | str] = (),
    *,
    out: str | Path,
    model: str | Path = DEFAULT_MODEL,
    mode: str = "dynamic",
    quantize: str | None = None,
    seed: int = 0,
    steps: int = 9,
    width: int = 1024,
    height: int = 1024,
    guidance: float = 0.0,
    negative_prompt: str | None = None,
    dtype: str | torch.dtype = "bf16",
    device: str | None = None,
    progress: bool = False,
    pipeline=None,
) -> GenerateResult:
    """Generate one image and save it at `out`. `pipeline`: reuse an already loaded Z-Image pipeline of
    any class (adapters are applied to its transformer and text encoder and removed again afterwards)."""
    from ..apply import apply_adapter, remove_adapter

    started = time.perf_counter()
    out = Path(out)
    if not out.parent.exists():
        raise LoRAError(f"{out.parent}: no such folder for the output image.")
    if steps < 1 or width < 16 or height < 16:
        raise InvalidFormatError(f"steps must be >= 1 and the size at least 16x16 (got {steps}, {width}x{height}).")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = text_to_image(pipeline if pipeline is not None else load_pipeline(model, torch_dtype))
    pipe.to(device)
    if quantize:
        quantize_transformer(pipe.transformer, quantize)
    specs = [parse_lora_spec(s) if isinstance(s, str) else s for s in loras]
    result = GenerateResult(out=out, seconds=0.0)
    try:
        for spec, name in zip(specs, _names(specs), strict=True):
            result.adapters.append(apply_adapter(pipe, spec, mode=mode, name=name))
        image = _run(pipe, prompt, negative_prompt, seed, steps, width, height, guidance, device, progress)
    finally:
        if pipeline is not None and result.adapters:
            remove_adapter(pipe)
    image.save(out)
    result.seconds = time.perf_counter() - started
    return result


def _run(pipe, prompt, negative_prompt, seed, steps, width, height, guidance, device, progress: bool):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=generator,
    )
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if not progress:
        return pipe(**kwargs).images[0]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("steps", total=steps)

        def on_step(_pipe, _i, _t, callback_kwargs):
            bar.advance(task)
            return callback_kwargs

        return pipe(**kwargs, callback_on_step_end=on_step).images[0]
