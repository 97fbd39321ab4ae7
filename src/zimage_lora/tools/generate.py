"""Text-to-image with diffusers' Z-Image pipelines and our adapters (dynamic or merged), optionally on
a torchao-quantized transformer, offline from the Hugging Face cache when the model is there."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..apply.components import PIPELINE_CLASSES
from ..blocks import check_patterns
from ..blocks import parse as parse_blocks
from ..errors import DownloadError, InvalidFormatError, UnsupportedError
from ..scheduling import check_points
from ..scheduling import parse as parse_schedule
from ..scheduling import schedule as scheduled
from ..sources import LoRAConfiguration
from . import generate_checks as checks
from .generate_regions import check_region_caption, parse_regions
from .output import output_error, written_aside
from .specs import parse_lora_spec

if TYPE_CHECKING:
    import PIL.Image

    from ..apply.report import ApplyReport

# A diffusers pipeline, of whatever class its model_index.json names; diffusers types none of their calls.
Pipeline = Any
DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("int8", "float8", "int4")


@dataclass
class GenerateResult:
    out: Path
    seconds: float
    adapters: list[ApplyReport] = field(default_factory=list)  # the engine's reports


@contextmanager
def _loading_bars(shown: bool) -> Iterator[None]:
    """diffusers' and transformers' own loading bars, hidden when the caller asked for no progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if shown:
        yield
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_pipeline(model: str | Path, dtype: torch.dtype, progress: bool = True) -> Pipeline:
    """The folder's Z-Image pipeline (any class, from its model_index.json), from the local cache first;
    online only when that fails. `progress=False` hides the loading bars too."""
    with _loading_bars(progress):
        return _load_pipeline(model, dtype)


def _load_pipeline(model: str | Path, dtype: torch.dtype) -> Pipeline:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype, local_files_only=True)  # type: ignore[no-untyped-call]  # unannotated in diffusers
    except (OSError, ValueError) as local_exc:
        if Path(str(model)).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise DownloadError(
                f"{_named(model)}: cannot load the pipeline from disk or the Hugging Face cache ({_cause(local_exc)}). "
                "Pass a local diffusers pipeline folder as --model (model=... in Python), or download it "
                f"once while online (`hf download {model}`)."
            ) from None
        try:
            pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype)  # type: ignore[no-untyped-call]  # unannotated in diffusers
        except (OSError, ValueError) as exc:
            raise DownloadError(
                f"{_named(model)}: not in the Hugging Face cache and the download failed ({_cause(exc)}). "
                "Check the id and the network, or pass a local pipeline folder as --model (model=... in Python)."
            ) from None
    if type(pipe).__name__ not in PIPELINE_CLASSES:
        raise UnsupportedError(
            f"{model}: a {type(pipe).__name__}, not a Z-Image pipeline; expected one of {', '.join(PIPELINE_CLASSES)}."
        )
    return pipe


def _named(model: str | Path) -> str:
    return f"{model} (the default; choose another with --model)" if str(model) == DEFAULT_MODEL else str(model)


def _cause(exc: BaseException) -> str:
    """The first line of a loader's error, without its advice to read a stack trace nobody is shown."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for tail in ("Please check out the root cause in the stacktrace above.", "Check your internet connection"):
        text = text.split(tail)[0].strip()
    text = text.rstrip(". ") or type(exc).__name__
    return text if len(text) <= 200 else text[:200].rsplit(" ", 1)[0] + " ..."


def text_to_image(pipe: Pipeline) -> Pipeline:
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
        # torch.int4 exists at run time (torch 2.6+) but not in torch's stubs
        "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),  # type: ignore[attr-defined]
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


def _specs(
    loras: Sequence[LoRAConfiguration | str], filename: str | None, revision: str | None
) -> list[LoRAConfiguration]:
    specs = [parse_lora_spec(s) if isinstance(s, str) else s for s in loras]
    if filename is not None or revision is not None:
        if len(specs) != 1:
            raise InvalidFormatError(
                f"--filename / --revision apply to one --lora, and {len(specs)} were given; pass each adapter's "
                "own file path instead (a local copy, or a folder holding one .safetensors)."
            )
        specs[0].filename = filename if filename is not None else specs[0].filename
        specs[0].revision = revision if revision is not None else specs[0].revision
    return specs


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
    pipeline: Pipeline | None = None,
    overwrite: bool = False,
    filename: str | None = None,
    revision: str | None = None,
    blocks: Mapping[str, float] | str | None = None,
    schedule: Sequence[tuple[float, float]] | str | None = None,
    regions: Mapping[int, Any] | Sequence[str] | None = None,
    region_caption: float | str = "mean",
) -> GenerateResult:
    """Generate one image and save it at `out` (an existing file only with `overwrite`).

    `pipeline`: reuse an already loaded Z-Image pipeline of any class (adapters are applied to its
    transformer and text encoder and removed again afterwards). `filename` / `revision`: pick the file
    and hub revision of the one adapter given. `blocks`: per-block strengths ({pattern: number}, or the
    command line's "layers.0-9=0.4,noise_refiner=0" or a JSON file) multiplying each adapter's scale
    (see `zimage_lora.blocks`). `schedule`: (fraction, factor) points, or "0:1.0,0.6:0.3", multiplying
    each adapter's strength over the steps (see `zimage_lora.scheduling`). `regions`: {position of an
    adapter in `loras`, from 1: mask or box}, or the command line's "1=0,0,0.5,1" / "2=mask.png", each
    adapter acting only there (`zimage_lora.regional_adapters`; dynamic mode); `region_caption`: the
    weight of caption tokens, a number or "mean" (the mask's mean). Everything that can be checked
    without the pipeline (output, adapters, device, size, model) is checked before it is loaded.
    """
    from ..apply import apply_adapter, remove_adapter
    from ..apply.regional import regional_adapters

    started = time.perf_counter()
    out = Path(out)
    specs = _specs(loras, filename, revision)
    points = parse_schedule(schedule) if isinstance(schedule, str) else check_points(schedule) if schedule else None
    per_block = parse_blocks(blocks) if isinstance(blocks, str) else dict(check_patterns(blocks)) if blocks else None
    masks = parse_regions(regions, len(specs), mode) if regions else None
    caption = check_region_caption(region_caption)
    checks.check_image_out(out, overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checks.check_device(device)
    if pipeline is None:
        multiple = checks.check_model(model)
    else:
        multiple = 2 * getattr(pipeline, "vae_scale_factor", checks.DEFAULT_SIZE_MULTIPLE // 2)
    checks.check_size(width, height, steps, multiple)
    checks.check_adapters(specs)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    pipe = text_to_image(pipeline if pipeline is not None else load_pipeline(model, torch_dtype, progress))
    pipe.to(device)
    if quantize:
        quantize_transformer(pipe.transformer, quantize)
    result = GenerateResult(out=out, seconds=0.0)
    try:
        for spec, name in zip(specs, _names(specs), strict=True):
            result.adapters.append(apply_adapter(pipe, spec, mode=mode, name=name, scale=per_block or 1.0))
        over_steps = scheduled(pipe, {r.name: points for r in result.adapters}) if points and result.adapters else None
        named = {result.adapters[i - 1].name: mask for i, mask in (masks or {}).items()}
        in_regions = regional_adapters(pipe, named, caption=caption) if named else None
        with over_steps or nullcontext(), in_regions or nullcontext():
            image = _run(pipe, prompt, negative_prompt, seed, steps, width, height, guidance, device, progress)
    finally:
        if pipeline is not None and result.adapters:
            remove_adapter(pipe)
    _save(image, out)
    result.seconds = time.perf_counter() - started
    return result


def _save(image: PIL.Image.Image, out: Path) -> None:
    """Written aside and moved into place: an existing image is replaced whole or not at all."""
    from PIL import Image

    try:
        with written_aside(out) as tmp:
            image.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
    except OSError as exc:
        raise output_error(exc, out) from None


def _run(pipe: Pipeline, prompt: str, negative_prompt: str | None, seed: int, steps: int, width: int, height: int,
         guidance: float, device: str | None, progress: bool) -> PIL.Image.Image:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=generator,
    )
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if not progress:
        image: PIL.Image.Image = pipe(**kwargs).images[0]
        return image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("steps", total=steps)

        def on_step(_pipe: Pipeline, _i: int, _t: torch.Tensor, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.advance(task)
            return callback_kwargs

        stepped: PIL.Image.Image = pipe(**kwargs, callback_on_step_end=on_step).images[0]
        return stepped
