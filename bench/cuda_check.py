"""Device check: every algorithm merged and dynamic on a CUDA tiny model, against the CPU result,
with exact restore. Run: PYTHONPATH=src python bench/cuda_check.py (needs a GPU)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import zimage_lora as zl
from zimage_lora import examples

LAYOUTS = ["kohya", "comfy-fused", "lycoris-lokr-factorized", "lycoris-loha", "lycoris-full", "peft-dora",
           "lycoris-dora"]


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref_model = examples.tiny_model()
        inputs = examples.tiny_inputs()
        for layout in LAYOUTS:
            out = Path(tmp) / (layout if layout.startswith("peft") else layout + ".safetensors")
            path = examples.make_adapter(layout, out, ref_model)
            cpu = examples.tiny_model()
            zl.apply_adapter(cpu, path, scale=0.7)
            want = examples.run_model(cpu, inputs)
            for mode in ("dynamic", "merged"):
                gpu = examples.tiny_model().cuda()
                before = {k: v.clone() for k, v in gpu.state_dict().items()}
                gin = {"x": [x.cuda() for x in inputs["x"]], "t": inputs["t"].cuda(),
                       "cap_feats": [c.cuda() for c in inputs["cap_feats"]]}
                zl.apply_adapter(gpu, path, scale=0.7, mode=mode)
                got = examples.run_model(gpu, gin).cpu()
                zl.remove_adapter(gpu)
                exact = all(torch.equal(before[k], v) for k, v in gpu.state_dict().items())
                err = float((got - want).norm() / (want.norm() + 1e-12))
                ok = exact and err < 1e-3
                failures += not ok
                print(f"{layout:26s} {mode:8s} rel.err vs CPU {err:.2e} restore exact {exact} {'ok' if ok else 'FAIL'}")
    print("all passed" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
