"""torch.compile of the real (tiny) Z-Image transformer with a dynamic adapter: the forward gate must hand
the compiled graph the model's own forward (it once inlined itself for ever: RecursionError), and a
re-weight must not recompile."""

from __future__ import annotations

import torch

import zimage_lora as zl
from zimage_lora import examples


def test_compiled_transformer_with_adapter_runs_and_reweights_without_recompile(tmp_path, one_torch_thread):
    torch.compiler.reset()
    model = examples.tiny_model(seed=0)
    path = examples.make_adapter("kohya", tmp_path / "a.safetensors", model)
    inputs = examples.tiny_inputs(seed=1)
    zl.apply_adapter(model, str(path), scale=1.0, name="a")
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return compiled(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0][0].float()

    try:
        run()
        run()  # diffusers' own rope cache is filled on the first call and guarded: one recompile of its own
        n = len(graphs)
        for strength in (0.3, -1.5):
            zl.set_adapter_scale(model, "a", strength)
            torch.testing.assert_close(run(), examples.run_model(model, inputs), rtol=1e-5, atol=1e-5)
        assert len(graphs) == n, "a re-weight recompiled the transformer"
        zl.set_adapter_scale(model, "a", 0.0)
        zl.remove_adapter(model, "a")
        base = examples.tiny_model(seed=0)
        torch.testing.assert_close(examples.run_model(model, inputs), examples.run_model(base, inputs))
    finally:
        torch.compiler.reset()

