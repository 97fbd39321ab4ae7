"""Where adapter files come from: a local file, a local folder, or a Hugging Face Hub repository.

Only safetensors files are ever read. Pickle-based files (.ckpt, .pt, .bin, ...) are refused
without being opened, since loading them can run arbitrary code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .errors import (
    AdapterNotFoundError,
    AmbiguousSourceError,
    DownloadError,
    InvalidArgumentError,
    InvalidFormatError,
    UnsafeFileError,
    _LegacyArgumentError,
)
from .formats.untrusted import read_json_file
from .fp32 import FP32_MAX, fits_fp32

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class LoRAConfiguration:
    """An adapter source and its strength.

    `source`: a `.safetensors` path, a folder, or a hub id `org/name`. `filename` picks one file in a
    folder or repository; `revision` a hub branch, tag or commit. `scale`: any float (negative and
    above 1 included). `name`: the name it is attached under (default: derived from the source).
    """

    source: str | Path
    scale: float = 1.0
    filename: str | None = None
    revision: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        self.scale = parse_strength(self.scale)


def parse_strength(value: object, *, where: str = "scale") -> float:
    """An adapter strength: any finite number within float32's range (negative and above 1 included).

    The one check for every entry point (API, `--lora SOURCE:SCALE`): NaN would merge as nothing or
    poison the weights, and 1e39 overflows the fp32 delta.
    """
    try:
        if isinstance(value, bool):  # float(True) is 1.0, but True is no strength anyone meant
            raise TypeError
        number = float(cast(Any, value))  # numbers, numpy scalars, 0-d tensors, numeric text; else it raises
    except (TypeError, ValueError, OverflowError):
        raise _LegacyArgumentError(f"{where}: bad strength {value!r}; expected a number such as 0.8 or -0.5.") from None
    if not fits_fp32(number):
        raise _LegacyArgumentError(
            f"{where}: bad strength {value!r}; expected a finite number within float32's range "
            f"(|strength| <= {FP32_MAX:.3g}), such as 0.8 or -0.5."
        )
    return number


@dataclass
class ResolvedSource:
    path: Path
    config: dict[str, object] | None  # PEFT adapter_config.json, when the source is a PEFT folder

    @property
    def default_name(self) -> str:
        stem = self.path.stem
        if stem == "adapter_model":
            stem = self.path.parent.name
        return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "adapter"


# Indirection so tests can stand in for the network.
def _hf_hub_download(**kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    path: str = hf_hub_download(**kwargs)
    return path


def _snapshot_download(**kwargs: Any) -> str:
    from huggingface_hub import snapshot_download

    path: str = snapshot_download(**kwargs)
    return path


def resolve_source(cfg: LoRAConfiguration | str | Path) -> ResolvedSource:
    if not isinstance(cfg, LoRAConfiguration):
        cfg = LoRAConfiguration(cfg)
    if cfg.filename is not None:
        _check_filename(cfg.filename, str(cfg.source))
    path = Path(str(cfg.source)).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name over the filesystem's limit: a caller mistake, not a missing file
        raise InvalidArgumentError(
            f"{str(cfg.source)[:120]}...: not a usable path ({exc.strerror or exc}); check the path."
        ) from None
    if exists:
        if path.is_dir():
            return _from_folder(path, cfg.filename)
        return ResolvedSource(_check_file(path), None)
    text = str(cfg.source)
    if _HUB_ID.match(text) and not _looks_like_a_path(path):
        return _from_hub(text, cfg.filename, cfg.revision)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if _HUB_ID.match(text):
        raise AdapterNotFoundError(
            f"{text}: no such file or folder{_nearest(path)}. It names a file (a file suffix, or a folder that exists "
            "here), so it is not taken as a Hugging Face repo id. Check the path (relative paths are from "
            "the current directory)."
        )
    raise AdapterNotFoundError(
        f"{text}: no such file or folder{_nearest(path)}, and not a Hugging Face repo id of the form "
        "'org/name'. Check the path (relative paths are from the current directory)."
    )


def _looks_like_a_path(path: Path) -> bool:
    """'api/style.safetenosrs' is a mistyped file, not a repo: a file-like suffix (letters only, as
    repo names such as 'model-v1.5' or 'Qwen2.5-VL' never end), or a first part that is a local folder."""
    suffix = path.suffix[1:]
    if len(suffix) >= 2 and suffix.isalpha():
        return True
    try:
        return Path(path.parts[0]).is_dir()
    except (OSError, IndexError):
        return False


def _nearest(path: Path) -> str:
    """'; nearest names here: a.safetensors, b.safetensors' from the deepest folder of `path` that exists."""
    import difflib

    folder, wanted = path.parent, path.name
    while not folder.is_dir() and folder != folder.parent:
        folder, wanted = folder.parent, folder.name
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return ""
    def score(name: str) -> float:  # the name or its stem ('styl' is near 'style.safetensors')
        return max(difflib.SequenceMatcher(None, wanted, n).ratio() for n in (name, Path(name).stem))

    close = sorted((n for n in names if score(n) >= 0.6), key=score, reverse=True)[:3]
    where = "" if str(folder) == "." else f" in {folder}"
    return f"; nearest names{where}: {', '.join(close)}" if close else ""


def _check_filename(filename: str, source: str) -> None:
    parts = Path(filename).parts
    if Path(filename).is_absolute() or ".." in parts or "\\" in filename:
        raise UnsafeFileError(
            f"{source}: filename {filename!r} points outside the folder or repository; "
            "give a path inside it (e.g. 'my_lora.safetensors' or 'sub/my_lora.safetensors')."
        )


def _refuse_pickle(path: Path) -> None:
    raise UnsafeFileError(
        f"{path}: '{path.suffix}' files are pickle-based and can run code when loaded; they are never opened. "
        "Convert it to safetensors in an environment you trust, e.g. "
        "`python -c \"import torch, safetensors.torch as st; "
        "st.save_file(torch.load('in.ckpt', weights_only=True), 'out.safetensors')\"`, "
        "or download the .safetensors version of the adapter."
    )


def _check_file(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_file():
        raise AdapterNotFoundError(f"{path}: not a regular file.")
    return path


def _from_folder(folder: Path, filename: str | None) -> ResolvedSource:
    config = _read_peft_config(folder)
    if filename is not None:
        path = folder / filename
        if not path.exists():
            raise AdapterNotFoundError(f"{folder}: has no file {filename!r}. Files: {_listing(folder)}.")
        return ResolvedSource(_check_file(path), config)
    if (folder / PEFT_WEIGHTS).is_file():
        return ResolvedSource(folder / PEFT_WEIGHTS, config)
    candidates = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if len(candidates) == 1:
        return ResolvedSource(candidates[0], config)
    if len(candidates) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in candidates[:20])
        raise AmbiguousSourceError(
            f"{folder}: holds {len(candidates)} .safetensors files ({names}); choose one with "
            "filename=... (CLI: SOURCE --filename NAME, or pass the file path itself)."
        )
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        _refuse_pickle(pickles[0])
    raise AdapterNotFoundError(f"{folder}: holds no .safetensors file. Files: {_listing(folder)}.")


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())[:20]
    return ", ".join(names) if names else "(empty)"


def _read_peft_config(folder: Path) -> dict[str, object] | None:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        return None
    doc = read_json_file(path, what="the adapter config", fix=f"Fix or delete {PEFT_CONFIG}.")
    if not isinstance(doc, dict):
        raise InvalidFormatError(f"{path}: expected a JSON object.")
    return doc


def _from_hub(repo_id: str, filename: str | None, revision: str | None) -> ResolvedSource:
    from huggingface_hub import errors as hf_errors

    display = repo_id + (f"/{filename}" if filename else "")
    try:
        if filename is not None:
            if Path(filename).suffix.lower() in PICKLE_SUFFIXES:
                _refuse_pickle(Path(display))
            local = Path(_hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
            config = _read_peft_config(local.parent)
            return ResolvedSource(_check_file(local), config)
        folder = Path(
            _snapshot_download(
                repo_id=repo_id, revision=revision, allow_patterns=["*.safetensors", PEFT_CONFIG]
            )
        )
    except hf_errors.GatedRepoError as exc:
        raise DownloadError(
            f"{display}: the repository is gated ({_short(exc)}). Accept its terms on the Hub and log in "
            "(`hf auth login` or HF_TOKEN)."
        ) from None
    except hf_errors.RepositoryNotFoundError as exc:
        raise DownloadError(
            f"{display}: repository not found or private ({_short(exc)}). Check the id; for a private repo "
            "log in (`hf auth login` or HF_TOKEN)."
        ) from None
    except hf_errors.RevisionNotFoundError as exc:
        raise DownloadError(f"{display}: revision {revision!r} not found ({_short(exc)}).") from None
    # LocalEntryNotFoundError subclasses EntryNotFoundError: the offline case must be caught first.
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        raise DownloadError(
            f"{display}: not in the local Hugging Face cache and the Hub cannot be reached "
            f"({_short(exc)}). Download it once while online (`hf download {repo_id}"
            f"{' ' + filename if filename else ''}`), point HF_HOME/HF_HUB_CACHE at a cache that has it, "
            "or pass a local path."
        ) from None
    except hf_errors.EntryNotFoundError as exc:
        raise DownloadError(
            f"{display}: the repository has no file {filename!r} ({_short(exc)}). Check the file name."
        ) from None
    except OSError as exc:
        raise DownloadError(f"{display}: download failed ({_short(exc)}). Check the network and try again.") from None
    return _from_folder(folder, None)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
