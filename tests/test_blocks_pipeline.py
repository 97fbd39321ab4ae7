"""Per-block strengths on a pipeline whose adapter also has a text-encoder part: the patterns name
transformer modules, the `text_encoder` key is the text encoder's one number (else it takes `*`), in
both modes, through apply and re-weight, and a refused mapping leaves both components as they were.
Expected outputs are written straight into copies of the weights (`patched`), not by the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import Pristine, output
from _pipeline_files import (
    RANK,
    TE_TARGETS,
    TR_ALPHA,
    TR_TARGETS,
    factors,
    patched,
    te_output,
    te_scale,
    token_inputs,
    write,
)
from _tiny_pipeline import tiny_pipeline

from zimage_lora import LoRAError, apply_adapter, remove_adapter, set_adapter_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5
# TR_TARGETS: layers.0.attention.to_q (block layers.0) and layers.1.feed_forward.w2 (block layers.1).
TO_Q, W2 = TR_TARGETS


@pytest.fixture
def setup(tmp_path):
    pipe = tiny_pipeline(seed=0)
    te_f, tr_f = factors(pipe.text_encoder, TE_TARGETS, 3), factors(pipe.transformer, TR_TARGETS, 103)
    path = write(tmp_path / "both.safetensors", "kohya", te_f, tr_f)
    inputs = token_inputs(pipe.text_encoder.config.vocab_size)
    te_output(pipe.text_encoder, inputs)  # transformers marks the model on its first forward: not ours
    base_te, base_tr = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.transformer)

    def expect(te_s: float, to_q_s: float, w2_s: float) -> tuple[torch.Tensor, torch.Tensor]:
        te = patched(base_te, [(n, f, te_s * te_scale("kohya")) for n, f in te_f.items()])
        tr_scale = TR_ALPHA / RANK
        tr = patched(base_tr, [(TO_Q, tr_f[TO_Q], to_q_s * tr_scale), (W2, tr_f[W2], w2_s * tr_scale)])
        return te_output(te, inputs), output(tr)

    def check(te_s: float, to_q_s: float, w2_s: float) -> None:
        want_te, want_tr = expect(te_s, to_q_s, w2_s)
        assert torch.allclose(te_output(pipe.text_encoder, inputs), want_te, atol=TOL, rtol=0)
        assert torch.allclose(output(pipe.transformer), want_tr, atol=TOL, rtol=0)

    return pipe, path, check


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_patterns_name_transformer_blocks_and_the_text_encoder_takes_its_key_or_star(setup, mode):
    pipe, path, check = setup
    te_pristine, tr_pristine = Pristine(pipe.text_encoder), Pristine(pipe.transformer)
    apply_adapter(pipe, path, name="a", mode=mode, scale={"*": 0.8, "layers.0": 0.0})
    check(0.8, 0.0, 0.8)  # no `text_encoder` key: the text encoder takes `*`
    set_adapter_scale(pipe, "a", {"*": 1.5, "layers.1": -0.5, "text_encoder": 0.25})
    check(0.25, 1.5, -0.5)
    set_adapter_scale(pipe, "a", {"text_encoder": 0.0})  # nothing for the transformer: 1.0 everywhere
    check(0.0, 1.0, 1.0)
    set_adapter_scale(pipe, "a", 2.0)
    check(2.0, 2.0, 2.0)
    remove_adapter(pipe, "a")
    te_pristine.assert_same(pipe.text_encoder)
    tr_pristine.assert_same(pipe.transformer)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_a_refused_mapping_leaves_both_components_as_they_were(setup, mode):
    pipe, path, check = setup
    apply_adapter(pipe, path, name="a", mode=mode, scale={"*": 0.5, "text_encoder": 2.0})
    check(2.0, 0.5, 0.5)
    te_state = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    with pytest.raises(LoRAError, match="nosuch"):
        set_adapter_scale(pipe, "a", {"text_encoder": 1.0, "nosuch": 3.0})
    with pytest.raises(LoRAError, match="text_encoder"):
        set_adapter_scale(pipe, "a", {"*": 1.0, "text_encoder": float("inf")})
    check(2.0, 0.5, 0.5)
    assert all(torch.equal(v, te_state[k]) for k, v in pipe.text_encoder.state_dict().items())
