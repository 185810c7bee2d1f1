"""Timestep-aware calibration data: (T, c, n) structure, modes, on-disk cache, streaming reads."""
from __future__ import annotations

import numpy as np
import torch

from qdiff.calib import CalibConfig, collect_calibration
from qdiff.sampling import SamplerConfig
from qdiff.sampling.samplers import initial_noise


def _collect(model, tmp_path, **kw):
    cfg = CalibConfig(**{"T": 10, "c": 2, "n": 3, "seed": 7, **kw}).resolve(10)
    return collect_calibration(model, SamplerConfig(steps=10), cfg, tmp_path, progress=False)


def test_uniform_set_keeps_n_inputs_every_c_steps(digits_model, tmp_path):
    calib, hit = _collect(digits_model, tmp_path)
    assert not hit
    assert len(calib) == 3 * 10 // 2 == 15
    kept = sorted(set(calib.step.tolist()))
    assert kept == [0, 2, 4, 6, 8]                      # timestep numbers t = T - i = 10, 8, 6, 4, 2
    assert all((calib.step == s).sum() == 3 for s in kept)
    assert len(calib.timesteps()) == 5
    assert calib.x.shape == (15, 1, 16, 16) and isinstance(calib.x, np.memmap), "streamed from disk"
    # the first kept input is the sampler's starting noise
    x0, t0, _ = calib.get(np.where(calib.step == 0)[0])
    assert torch.allclose(x0, initial_noise(digits_model.sample_shape, 3, 7))
    assert (t0 == t0[0]).all() and int(t0[0]) == 900  # DDIM-10 on 1000 training steps, leading spacing: 900, 800, ...


def test_cache_hits_and_keys_change_with_settings(digits_model, tmp_path):
    a, hit_a = _collect(digits_model, tmp_path)
    b, hit_b = _collect(digits_model, tmp_path)
    assert not hit_a and hit_b and a.root == b.root
    c, hit_c = _collect(digits_model, tmp_path, seed=8)
    d, hit_d = _collect(digits_model, tmp_path, c=5)
    assert not hit_c and not hit_d and len({a.root, c.root, d.root}) == 3
    assert len(d) == 3 * 2


def test_interrupted_collection_is_redone(digits_model, tmp_path):
    a, _ = _collect(digits_model, tmp_path)
    (a.root / "COMPLETE").unlink()
    b, hit = _collect(digits_model, tmp_path)
    assert not hit and (b.root / "COMPLETE").exists()


def test_t0_and_tmax_modes_take_every_input_from_one_step(digits_model, tmp_path):
    t0, _ = _collect(digits_model, tmp_path, mode="t0")
    tmax, _ = _collect(digits_model, tmp_path, mode="tmax")
    assert len(t0) == len(tmax) == 15                    # same N = n * T / c as the uniform set
    assert set(t0.step.tolist()) == {9} and set(tmax.step.tolist()) == {0}
    assert len(t0.timesteps()) == 1


def test_random_access_returns_rows_in_request_order(digits_model, tmp_path):
    calib, _ = _collect(digits_model, tmp_path)
    idx = [7, 2, 11]
    x, t, cond = calib.get(idx)
    for k, i in enumerate(idx):
        assert torch.equal(x[k], torch.from_numpy(np.asarray(calib.x[i])))
        assert int(t[k]) == int(calib.t[i])
    assert cond == {}
