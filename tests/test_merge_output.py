"""`merge` and its output: strengths from the command line, file-system failures, atomic overwrite,
leftovers of killed merges, and the warnings for no-op and repeated adapters. CLI cases read the
message: one `error:` line, no traceback, exit code 1, nothing left at --out."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zimage_lora import InvalidFormatError, LoRAConfiguration
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.tools import checkpoint_merge, output
from zimage_lora.tools.checkpoint_merge import merge_checkpoint
from zimage_lora.tools.specs import parse_lora_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(seed=1)
    folder = root / "transformer"
    model.save_pretrained(folder, max_shard_size="60KB")
    lora = make_adapter("kohya", root / "k.safetensors", model, rank=4, alpha=2.0)
    return model, folder, lora


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _stderr(capsys) -> str:
    """stderr with line wrapping undone (the console may wrap at the terminal width)."""
    return " ".join(capsys.readouterr().err.split())


def _merge_argv(folder, lora, out, *extra):
    return ["merge", "--model", str(folder), "--lora", str(lora), "--out", str(out), "--quiet", *extra]


# --- strengths (issue 11 item 6) ----------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["nan", "inf", "-inf", "NaN", "1e39", "-1e39", "abc", "0x1p3"])
def test_cli_refuses_bad_strengths(base, tmp_path, capsys, tail):
    _model, folder, lora = base
    out = tmp_path / "o.safetensors"
    err = _cli_error(capsys, _merge_argv(folder, f"{lora}:{tail}", out))
    assert f"bad strength '{tail}'" in err
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e39, "abc", True, None])
def test_one_strength_rule_for_the_api(value):
    with pytest.raises(InvalidFormatError, match="bad strength"):
        LoRAConfiguration("x.safetensors", value)


def test_strength_parsing_keeps_paths_with_colons(tmp_path):
    assert parse_lora_spec("a.safetensors:-0.5").scale == -0.5
    assert parse_lora_spec("a.safetensors:3e38").scale == 3e38
    odd = tmp_path / "v:2.safetensors"  # a colon inside an existing file name
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)).source == str(odd)
    assert parse_lora_spec("org/name").scale == 1.0
    assert parse_lora_spec("dir:x/a.safetensors").source == "dir:x/a.safetensors"


# --- file-system failures (item 7) -----------------------------------------------------------------

def _fail_writes(monkeypatch, code: int, after: int = 0):
    """The streaming writer's file writes raise OSError(code) after `after` successful writes."""
    real = checkpoint_merge.StreamingWriter
    calls = {"n": 0}

    class Failing(real):
        def write_raw(self, key, data):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(code, os.strerror(code))
            super().write_raw(key, data)

    monkeypatch.setattr(checkpoint_merge, "StreamingWriter", Failing)


@pytest.mark.parametrize("code,excerpt", [
    (errno.ENOSPC, "no space left on the disk holding"),
    (errno.EROFS, "read-only file system. Choose --out on a writable disk"),
    (errno.EACCES, "permission denied in"),
])
@pytest.mark.parametrize("name", ["out_dir", "out.safetensors"])
def test_write_failures_are_one_line_and_leave_nothing(base, tmp_path, capsys, monkeypatch, code, excerpt, name):
    _model, folder, lora = base
    _fail_writes(monkeypatch, code, after=3)
    out = tmp_path / name
    err = _cli_error(capsys, _merge_argv(folder, lora, out))
    assert f"cannot write {out}: " in err and excerpt in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_is_found_before_writing(base, tmp_path, capsys, monkeypatch):
    _model, folder, lora = base
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: type("U", (), {"total": 10**12, "free": 1000})())
    monkeypatch.setattr(checkpoint_merge, "StreamingWriter", None)  # never reached
    err = _cli_error(capsys, _merge_argv(folder, lora, tmp_path / "o.safetensors"))
    assert "no space left on the disk holding" in err and "MB needed" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out,excerpt", [
    ("missing/sub/o.safetensors", "is not an existing folder. Create it first (mkdir -p"),
    ("a" * 300 + ".safetensors", "the path is too long for the file system"),
    ("a" * 250 + ".safetensors", "the path is too long for the file system"),  # fits, but its temp name would not
])
def test_bad_out_paths(base, tmp_path, capsys, out, excerpt):
    _model, folder, lora = base
    err = _cli_error(capsys, _merge_argv(folder, lora, tmp_path / out))
    assert excerpt in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_proc_is_not_a_place_for_output(base, capsys):
    _model, folder, lora = base
    err = _cli_error(capsys, _merge_argv(folder, lora, "/proc/merged.safetensors"))
    assert "cannot create files in /proc" in err
    assert not os.path.exists("/proc/merged.safetensors")


# --- atomic overwrite and leftovers (item 9) ---------------------------------------------------------

def test_overwrite_moves_the_old_output_aside_first(base, tmp_path, monkeypatch):
    """Killed between 'old aside' and 'new in', the old output is intact under its aside name; killed
    after, the new one is complete. `out` never holds a mix or a half-deleted folder."""
    model, folder, lora = base
    out = tmp_path / "merged"
    merge_checkpoint(folder, [f"{lora}:0.5"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    steps = []
    real_replace = os.replace

    def replace(src, dst):
        steps.append((os.path.basename(src), os.path.basename(dst)))
        if len(steps) == 2:  # the new folder moving in: the old one must already be aside, whole
            aside = tmp_path / f".merged.old-{os.getpid()}"
            assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)  # the two-rename path (no renameat2)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(folder, [f"{lora}:1.0"], out, overwrite=True)
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert steps[0] == ("merged", f".merged.old-{os.getpid()}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # put back when the move in failed
    merge_checkpoint(folder, [f"{lora}:1.0"], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_merge_are_cleaned(base, tmp_path, capsys):
    _model, folder, lora = base
    dead = _dead_pid()
    (tmp_path / f".o.safetensors.partial-{dead}").write_bytes(b"x" * 1000)
    (tmp_path / f".o.safetensors.old-{dead}").mkdir()
    alive = tmp_path / f".o.safetensors.partial-{os.getppid()}"  # a running process: not ours to delete
    alive.write_bytes(b"y")
    other = tmp_path / f".other.safetensors.partial-{dead}"  # another output's leftover: not this merge's
    other.write_bytes(b"z")
    assert main(_merge_argv(folder, lora, tmp_path / "o.safetensors")) == 0
    err = _stderr(capsys)
    assert f"warning: removed .o.safetensors.partial-{dead}, left by an interrupted merge" in err
    assert f"{alive.name} belongs to a merge still running; left alone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "o.safetensors"])


# --- messages for merge (issue 12 item 5) ------------------------------------------------------------

def test_scale_zero_warns_and_counts_nothing_changed(base, tmp_path, capsys):
    model, folder, lora = base
    out = tmp_path / "o.safetensors"
    assert main(_merge_argv(folder, f"{lora}:0", out)) == 0
    captured = capsys.readouterr()
    err, summary = " ".join(captured.err.split()), " ".join(captured.out.split())
    assert "warning: " in err and "strength 0 changes nothing; it was not merged" in err
    assert "(0 changed)" in summary
    merged = load_file(str(out))
    for key, value in model.state_dict().items():
        assert torch.equal(merged[key], value)


def test_changed_counts_only_tensors_whose_bytes_changed(base, tmp_path):
    model, folder, lora = base
    # fp32 checkpoint written as bf16: a delta of 1e-12 relative is lost in rounding, so nothing changed.
    report = merge_checkpoint(folder, [f"{lora}:1e-12"], tmp_path / "o.safetensors", dtype="bf16")
    assert report.merged_tensors == 0
    report = merge_checkpoint(folder, [f"{lora}:1"], tmp_path / "p.safetensors", dtype="bf16")
    assert report.merged_tensors == 37


def test_the_same_adapter_twice_warns(base, tmp_path, capsys):
    _model, folder, lora = base
    argv = _merge_argv(folder, lora, tmp_path / "o.safetensors") + ["--lora", f"{lora}:0.5"]
    assert main(argv) == 0
    err = _stderr(capsys)
    assert "is given 2 times; each one is merged, so its effect adds up" in err


def test_missing_output_folder_says_how_to_create_it(base, tmp_path, capsys):
    _model, folder, lora = base
    out = tmp_path / "no" / "merged"
    err = _cli_error(capsys, _merge_argv(folder, lora, out))
    assert f"mkdir -p '{out.parent}'" in err


def test_over_long_adapter_and_model_paths(base, tmp_path, capsys):
    _model, folder, lora = base
    long = str(tmp_path / ("x" * 5000 + ".safetensors"))
    err = _cli_error(capsys, _merge_argv(folder, long, tmp_path / "o.safetensors"))
    assert "not a usable path (File name too long)" in err
    err = _cli_error(capsys, _merge_argv(tmp_path / ("m" * 5000), lora, tmp_path / "o.safetensors"))
    assert "not a usable model path (File name too long)" in err
