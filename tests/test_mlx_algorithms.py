"""Every algorithm of the registry on an MLX model, both modes, against the PyTorch engine on the
diffusers model the MLX model mirrors: the same output on every layer, or a clear `UnsupportedError`
naming the algorithm. A new algorithm without a fixture here fails `test_every_algorithm_has_a_fixture`.

Fixtures come from the peers that write each algorithm: the library's example writer for LoRA, LoKr,
LoHa and full diffs (checked against LyCORIS and PEFT elsewhere); LyCORIS's own `create_lycoris` +
`save_weights` for GLoRA, OFT, BOFT and IA3 (`test_lycoris_extra_apply._lycoris`); PEFT's own
`save_pretrained` for OFT v2 and BOFT on the input side (`test_oft_input`, `test_boft_input`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="the [mlx] extra is not installed")

import _mlx  # noqa: E402
from test_mlx_engine import arrays, layer_gap  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora import algorithms  # noqa: E402
from zimage_lora.examples import make_adapter, tiny_model  # noqa: E402


def _example(layout: str) -> Callable[[torch.nn.Module, Path], Path]:
    return lambda model, tmp: make_adapter(layout, tmp / f"{layout}.safetensors", model)


def _lycoris(case: str) -> Callable[[torch.nn.Module, Path], Path]:
    def build(model: torch.nn.Module, tmp: Path) -> Path:
        pytest.importorskip("lycoris", reason="LyCORIS is not installed (pip install lycoris-lora)")
        import lycoris
        import test_lycoris_extra_apply as ly

        presets = {n: getattr(lycoris.LycorisNetwork, n) for n in dir(lycoris.LycorisNetwork) if n.isupper()}
        try:
            ly._lycoris(model, case, tmp / f"{case}.safetensors")
        finally:  # its presets are class attributes: put them back
            for n, v in presets.items():
                setattr(lycoris.LycorisNetwork, n, v)
        return tmp / f"{case}.safetensors"

    return build


def _peft(kind: str) -> Callable[[torch.nn.Module, Path], Path]:
    def build(model: torch.nn.Module, tmp: Path) -> Path:
        pytest.importorskip("peft", reason="PEFT is not installed")
        if kind == "oft":
            import test_oft_input

            return Path(test_oft_input._peft_folder(model, tmp, block=8)[0])
        import test_boft_input

        return Path(test_boft_input._peft_folder(model, tmp, scaled_rows=False)[0])

    return build


BUILDERS = {
    "lora": _example("diffusers"),
    "lokr": _example("lycoris-lokr-tucker"),
    "loha": _example("lycoris-loha"),
    "full": _example("lycoris-full"),
    "glora": _lycoris("glora"),
    "oft": _lycoris("oft-constraint"),
    "boft": _lycoris("boft"),
    "ia3": _lycoris("ia3-input"),
    "oft-input": _peft("oft"),
    "boft-input": _peft("boft"),
}


def test_every_algorithm_has_a_fixture():
    assert sorted(algorithms.names()) == sorted(BUILDERS)


@pytest.mark.parametrize("algorithm", sorted(algorithms.names()))
def test_every_algorithm_on_mlx(tmp_path, algorithm):
    model, base = tiny_model(0), tiny_model(0)
    path = BUILDERS[algorithm](model, tmp_path)
    twin = _mlx.mirror(model)
    pristine = arrays(twin)
    assert {t.algorithm for t in zl.load_adapter(path, twin).targets} == {algorithm}
    for mode, scale in (("dynamic", 0.8), ("merged", -0.6)):
        try:
            zl.apply_adapter(twin, path, mode=mode, scale=scale, name="x")
        except zl.UnsupportedError as exc:  # allowed, if it says what is missing
            assert algorithm in str(exc) and arrays(twin) == pristine
            continue
        zl.apply_adapter(model, path, mode=mode, scale=scale, name="x")
        assert layer_gap(model, twin, base) < 1e-4, (algorithm, mode)
        zl.remove_adapter(model)
        assert zl.remove_adapter(twin) == ["x"] and arrays(twin) == pristine
