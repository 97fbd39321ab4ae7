"""The command line as a new user meets it: light start-up, quiet output, readable tables, JSON
summaries, version, completion, and messages that name the command-line fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ZIMAGE_LORA_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


MODULES_AFTER = """
import json, sys
from zimage_lora.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = ("torch", "diffusers", "transformers", "peft", "torchao", "bitsandbytes", "gguf")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def turbo_lora(tmp_path_factory) -> Path:
    """A small LoRA for the default model (Z-Image-Turbo names and shapes) plus one long unknown key."""
    path = tmp_path_factory.mktemp("turbo") / "turbo_style.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(2, 3840, generator=g),
        "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(3840, 2, generator=g),
    }
    for i in range(45):  # unmatched: more than the default listing shows, longer than 80 columns
        stem = f"diffusion_model.not_in_this_model_block_{i:02d}.with_a_rather_long_module_name_for_wrapping.proj"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{stem}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    save_file(tensors, str(path))
    return path


# --- start-up --------------------------------------------------------------------------------------------

def test_help_imports_no_torch():
    proc = run_python(MODULES_AFTER, "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "inspect" in proc.stdout and "completion" in proc.stdout and "--verbose" in proc.stdout
    assert _last_json(proc.stdout) == {"code": 0, "loaded": []}


def test_inspect_default_model_without_diffusers_and_quiet(turbo_lora):
    proc = run_python(MODULES_AFTER, "inspect", str(turbo_lora), "--json")
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["code"] == 0
    assert not {"diffusers", "transformers", "peft", "torchao", "bitsandbytes", "gguf"} & set(result["loaded"])
    info = json.loads("\n".join(lines[:-1]))
    assert info["matched_count"] == 1 and info["model_linear_count"] == 276


def test_demo_is_quiet():
    """diffusers is imported by the demo (its tiny model); with the quantization packages installed that
    import logs kernel and deprecation lines (torchao, bitsandbytes, torch's pytree): all hidden."""
    code = "import sys; from zimage_lora.cli import main; sys.exit(main(sys.argv[1:]))"
    quiet = run_python(code, "demo", "--layouts", "kohya")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "all passed" in quiet.stdout


def _noisy_command(args):
    """A command that does what a third-party import does: a log line and a warning."""
    import logging
    import warnings

    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    warnings.warn_explicit("register_constant() is deprecated", DeprecationWarning, "pytree.py", 630,
                           module="torch.utils._pytree")
    warnings.warn_explicit("lost 40% of its delta", UserWarning, "engine.py", 1, module="zimage_lora.apply.engine")
    return 0


@pytest.mark.parametrize("flag", [None, "--verbose", "-v"])
def test_third_party_noise_hidden_unless_verbose(flag, monkeypatch, capsys, caplog):
    import logging
    import warnings

    from zimage_lora.commands import demo

    monkeypatch.setattr(demo, "run", _noisy_command)
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", *([flag] if flag else [])]) == 0
    messages = [str(w.message) for w in caught]
    assert "lost 40% of its delta" in messages  # our own warnings always reach the user
    shown = "register_constant() is deprecated" in messages, "Failed to load _C_mxfp8.so" in caplog.text
    assert shown == ((True, True) if flag else (False, False))
    assert logging.root.manager.disable == logging.NOTSET  # restored after the command


def test_library_apply_on_plain_model_is_quiet_and_imports_no_quantization_package(tmp_path):
    """`import zimage_lora` + apply on a plain torch model: nothing on stderr, no optional import."""
    path = tmp_path / "plain.safetensors"
    save_file({"diffusion_model.blocks.0.proj.lora_A.weight": torch.ones(2, 8),
               "diffusion_model.blocks.0.proj.lora_B.weight": torch.ones(8, 2)}, str(path))
    code = f"""
import sys, torch, zimage_lora
model = torch.nn.Module()
model.blocks = torch.nn.ModuleList([torch.nn.Module()])
model.blocks[0].proj = torch.nn.Linear(8, 8)
report = zimage_lora.apply_adapter(model, {str(path)!r}, mode="merged")
zimage_lora.remove_adapter(model)
optional = ("diffusers", "transformers", "peft", "torchao", "bitsandbytes", "gguf")
print(len(report.applied), [m for m in optional if m in sys.modules])
"""
    proc = run_python(code)
    assert proc.stderr == ""
    assert proc.stdout.strip() == "1 []"


# --- output ------------------------------------------------------------------------------------------------

def test_piped_output_keeps_keys_whole_and_lists_all_with_all(turbo_lora, capsys):
    assert main(["inspect", str(turbo_lora)]) == 0
    out = capsys.readouterr().out
    key = "diffusion_model.not_in_this_model_block_00.with_a_rather_long_module_name_for_wrapping.proj.lora_A.weight"
    assert len(key) > 80
    assert any(key in line for line in out.splitlines())  # one line: not wrapped at 80 columns
    assert str(turbo_lora) in out.splitlines()[0]
    assert "50 more unmatched keys" in out and "--all" in out  # 90 keys, 40 shown
    assert main(["inspect", str(turbo_lora), "--all"]) == 0
    out = capsys.readouterr().out
    tail = "with_a_rather_long_module_name_for_wrapping.proj.lora_A.weight"
    assert all(f"block_{i:02d}.{tail}" in out for i in range(45))
    assert "more unmatched" not in out


def test_every_table_column_has_a_header(turbo_lora, capsys):
    assert main(["inspect", str(turbo_lora)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["field", "value"]
    assert any(line.split() == ["┃", "block", "┃", "matched", "┃"] for line in lines)
    assert any(line.split() == ["┃", "key", "┃", "reason", "┃"] for line in lines)
    assert main(["demo", "--layouts", "kohya"]) == 0
    demo = capsys.readouterr().out
    header = next(line for line in demo.splitlines() if "layout" in line and "┃" in line)
    cells = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert all(cells) and cells[-1] == "result"


def test_version(capsys):
    for flag in ("-V", "--version"):
        with pytest.raises(SystemExit) as exc:
            main([flag])
        assert exc.value.code == 0
        from zimage_lora import __version__

        assert capsys.readouterr().out.strip() == f"zimage-lora {__version__}"


def test_demo_json(capsys):
    assert main(["demo", "--layouts", "kohya,peft", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is True and doc["layouts"] == 2 and doc["modes"] == ["dynamic", "merged"]
    assert [(r["layout"], r["mode"]) for r in doc["rows"]] == [
        ("kohya", "merged"), ("kohya", "dynamic"), ("peft", "merged"), ("peft", "dynamic")]
    assert all(r["restore_exact"] and r["targets"] == 37 for r in doc["rows"])


def test_convert_json(tmp_path, tiny, tiny_config_file, capsys):
    src = make_adapter("kohya", tmp_path / "k.safetensors", tiny)
    out = tmp_path / "c.safetensors"
    args = ["convert", str(src), "--to", "comfy", "--out", str(out), "--model", str(tiny_config_file), "--json"]
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert captured.err == ""
    assert doc["out"] == str(out) and doc["to"] == "comfy" and doc["format"] == "kohya" and doc["modules"] == 37
    assert doc["unmatched"] == [] and out.is_file()


def test_merge_json(tmp_path, capsys):
    model = tiny_model(seed=0)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    lora = make_adapter("diffusers", tmp_path / "d.safetensors", model)
    out = tmp_path / "merged"
    capsys.readouterr()  # what building the model printed (diffusers, when first imported under pytest)
    assert main(["merge", "--model", str(folder), "--lora", f"{lora}:0.5", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert captured.err == ""
    assert doc["out"] == str(out) and doc["tensors"] == len(model.state_dict())
    assert doc["merged_tensors"] == 37 and doc["bytes_written"] > 0
    assert [(a["source"], a["scale"], a["targets"]) for a in doc["adapters"]] == [(str(lora), 0.5, 37)]


def test_piped_merge_summary_keeps_paths_whole(tmp_path, capsys):
    model = tiny_model(seed=0)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    lora = make_adapter("diffusers", tmp_path / "d.safetensors", model)
    out = tmp_path / ("a_long_output_folder_name_" * 4) / "merged"
    out.parent.mkdir()
    capsys.readouterr()
    assert main(["merge", "--model", str(folder), "--lora", str(lora), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert captured.err == ""
    assert len(str(out)) > 80 and any(line.startswith(f"wrote {out}: ") for line in lines)


# --- completion ----------------------------------------------------------------------------------------------

def test_completion_script_lists_commands_options_and_values(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o filenames -o bashdefault -F _zimage_lora zimage-lora" in script
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed: the script's behaviour cannot be run")

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        proc = subprocess.run(
            ["bash", "-c", f'eval "$1"; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _zimage_lora; '
                           'printf "%s\\n" "${COMPREPLY[@]}"', "bash", script],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return proc.stdout.split()

    assert complete("zimage-lora", "con") == ["convert"]
    assert complete("zimage-lora", "convert", "x.safetensors", "--to", "") == [
        "comfyui", "kohya-comfyui", "musubi", "diffusers", "peft", "ai-toolkit", "comfy", "kohya"]
    assert complete("zimage-lora", "inspect", "--j") == ["--json"]
    assert "--verbose" in complete("zimage-lora", "merge", "--")


def test_completion_zsh_uses_bashcompinit(capsys):
    assert main(["completion", "zsh"]) == 0
    assert "bashcompinit" in capsys.readouterr().out


# --- the handle ---------------------------------------------------------------------------------------------

def test_adapters_repr_lists_mode_strength_and_state(tmp_path, tiny):
    from zimage_lora import Adapters

    lora = Adapters(tiny)
    assert repr(lora) == "Adapters(ZImageTransformer2DModel: no adapters)"
    path = make_adapter("kohya", tmp_path / "k.safetensors", tiny)
    lora.load(path, name="style", scale=0.8)
    lora.load(path, name="hero", scale=-1.5, mode="merged")
    lora.set_adapters(["hero"])
    assert repr(lora) == (
        "Adapters(ZImageTransformer2DModel: 2 attached: style (dynamic, x0.8, inactive), "
        "hero (merged, x-1.5, active))"
    )


# --- optional packages ------------------------------------------------------------------------------------------

def test_plain_layers_consult_no_quantization_backend():
    """Even with torchao, bitsandbytes and gguf imported (diffusers imports them), a plain Linear never
    loads a quantized backend: a backend is considered only for layers whose classes come from its package."""
    from zimage_lora import backends

    for package in ("torchao", "bitsandbytes", "gguf"):
        pytest.importorskip(package, reason=f"{package} is in the [quant] extra")
    plain = torch.nn.Linear(4, 4)
    assert backends._candidates(plain) == []
    assert backends.backend_for(plain) is backends._PLAIN
