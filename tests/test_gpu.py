"""On a CUDA device (the whole module is skipped without one): every low-bit method on the UNet backbone and the
transformer path through a diffusers pipeline calibrate, reconstruct, export and load on the GPU, with every tensor
there; the transforms stay exact in full precision there too. CPU tests cannot catch a tensor made on the host
(the first H200 run found two such bugs in reconstruction: docs/paper_models.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qdiff
from qdiff.quant import QuantConfig, QuantLayer, quant_layers
from qdiff.recon import ReconConfig
from qdiff.testing import CALL_KWARGS, tiny_pipeline
from tiny_unet import TinyUNet, ddim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHORT = ReconConfig.preset("cpu", weight_iters=20, act_iters=5, batch_size=8, block_patterns=["down", "dec", "mid"],
                           probe_samples=8)
#: quant.* settings of each low-bit method (conf/lowbit/), at W4A4 where they matter most.
METHODS = {
    "qdiff": {},
    "smooth": {"smooth": 0.5},
    "lowrank": {"lowrank": 4},
    "groupwise": {"weight_group_size": 8},
    "timegroups": {"act_time_groups": 2},
    "dynamic": {"act_dynamic": True},
    "smooth_lowrank_dynamic": {"smooth": 0.5, "lowrank": 4, "act_dynamic": True},
}


@pytest.fixture(autouse=True)
def _deterministic_kernels():
    """Bit-exact comparisons on a GPU need deterministic kernels (``deterministic=true`` in a run): without them
    cuDNN's ConvTranspose2d forward changed in the last bit between two identical calls on an H200."""
    from qdiff.runtime import deterministic_kernels

    deterministic_kernels()
    yield
    deterministic_kernels(False)


def _on_gpu(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_lowbit_method_reconstructs_exports_and_loads_on_the_gpu(name, tmp_path):
    torch.manual_seed(0)
    net = TinyUNet().eval().cuda()
    calib = qdiff.calibration_data(net, ddim(), (1, 16, 16), T=10, c=2, n=8, cache_dir=None, progress=False)
    cfg = QuantConfig(method="qdiff", weight_bits=4, act_bits=4, **METHODS[name])
    q = qdiff.quantize(net, cfg, calib, SHORT, progress=False)
    assert _on_gpu(q) == {"cuda"}
    x, t, _ = calib.get(list(range(8)), "cuda")
    with torch.no_grad():
        out, ref = q(x, t), net(x, t)
        assert torch.equal(q(x, t), out)                           # the same bits on every call
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert 0 < float((out - ref).norm() / ref.norm()) < 1.0      # quantized, and still the same function
    qdiff.export(q, tmp_path / "art")
    d = qdiff.load_deployed(tmp_path / "art", backend="simulated", device="cuda")
    assert _on_gpu(d) == {"cuda"}
    with torch.no_grad():
        assert torch.equal(d(x, t), out)


def test_smoothing_and_a_low_rank_branch_change_no_fp_output_on_the_gpu():
    from qdiff.api import as_calibration, prepare
    from qdiff.quant.wrap import act_quantizers

    torch.manual_seed(0)
    net = TinyUNet().eval().cuda()
    g = torch.Generator().manual_seed(0)
    calib = as_calibration((torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 1000, (16,), generator=g)))
    q, _ = prepare(net, QuantConfig(method="linear", smooth=0.5, lowrank=4), calib.get([0, 1], "cuda"), calib)
    assert any(m.smooth is not None for _, m in quant_layers(q)) and any(m.rank for _, m in quant_layers(q))
    for _, layer in quant_layers(q):
        for wq in layer.wq:
            wq.enabled = False
    for _, aq in act_quantizers(q):
        aq.enabled = False
    x, t, _ = calib.get(list(range(8)), "cuda")
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):   # TF32 would round the two differently
        out, ref = q(x, t), net(x, t)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("lowbit", [{}, METHODS["smooth_lowrank_dynamic"]], ids=["w4a8", "w4a4_default"])
def test_a_transformer_pipeline_quantizes_samples_saves_and_loads_on_the_gpu(lowbit, tmp_path):
    pipe = tiny_pipeline("pixart_sigma").to("cuda")
    call = dict(CALL_KWARGS["pixart_sigma"])
    prompt = call.pop("prompt")
    call.pop("guidance_scale", None)
    cfg = QuantConfig(method="qdiff", weight_bits=4, act_bits=4 if lowbit else 8, **lowbit)
    qdiff.quantize_pipeline(pipe, cfg, calib=qdiff.CalibConfig(T=4, c=2, n=2, batch_size=2),
                            recon=ReconConfig.preset("cpu", weight_iters=8, act_iters=2, batch_size=4, probe_samples=2),
                            prompts=prompt, call_kwargs=call, progress=False)
    assert sum(isinstance(m, QuantLayer) for m in pipe.transformer.modules()) > 10
    assert _on_gpu(pipe.transformer) == {"cuda"}

    def sample(p):
        out = p(prompt=prompt, **call, num_inference_steps=3, generator=torch.Generator("cuda").manual_seed(0),
                output_type="np")
        return np.asarray(out.images)

    images = sample(pipe)
    assert np.isfinite(images).all()
    qdiff.save_pipeline(pipe, tmp_path / "saved")
    loaded = qdiff.load_pipeline(tmp_path / "saved", device="cuda")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(sample(loaded), images)
