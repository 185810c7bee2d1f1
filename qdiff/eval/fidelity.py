"""FID and IS through torch-fidelity.

RGB models use torch-fidelity's InceptionV3. The embedded digits model uses a small digits classifier
(trained by ``experiments/train_digits_classifier.py``) registered in torch-fidelity's own
feature-extractor registry as ``qdiff-digits``: its penultimate features drive FID, its logits IS.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from qdiff.errors import QDiffError
from qdiff.eval.config import EvalConfig

DIGITS_EXTRACTOR = "qdiff-digits"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class EvalSetupError(QDiffError):
    """The feature extractor's weights cannot be reached."""


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255] (the input format torch-fidelity expects)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageTensorDataset(Dataset):
    def __init__(self, images_uint8: torch.Tensor, rgb: bool) -> None:
        self.x = images_uint8
        self.rgb = rgb

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.x[i]
        if self.rgb and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x


def _register_digits_extractor() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DIGITS_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """Digits classifier as torch-fidelity extractor: uint8 [B,1|3,H,W] -> (features, logits)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            from qdiff.io import load_into, load_state_dict_file
            from qdiff.models.digits import CLASSIFIER_WEIGHTS, DigitsClassifier

            self.net = DigitsClassifier()
            load_into(self.net, load_state_dict_file(feature_extractor_weights_path or CLASSIFIER_WEIGHTS), "digits classifier")
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits_unbiased", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            x = x.float() / 127.5 - 1
            if x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            if x.shape[-1] != 16:
                x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
            feat, logits = self.net(x)
            out = {"features": feat, "logits_unbiased": logits, "logits": logits}
            return tuple(out[k] for k in self.features_list)

    torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)


def resolve_inception_weights(path: str | None, cache_dir: str | os.PathLike) -> str:
    """A local, weights-only-loadable InceptionV3 file, or one clear error (checked before any sampling)."""
    from qdiff.io import CheckpointError, load_state_dict_file

    if path is not None:
        try:
            state = load_state_dict_file(path)
        except CheckpointError as e:
            raise EvalSetupError(f"eval.inception_weights: {e}") from None
        if Path(path).suffix != ".safetensors":
            return str(path)
        out = Path(cache_dir) / "inception-from-safetensors.pth"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        return str(out)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not hub.is_file():
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        try:
            torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False)
        except Exception:
            raise EvalSetupError(
                f"FID/IS need torch-fidelity's InceptionV3 weights ({INCEPTION_FILE}) and they cannot be downloaded "
                f"from {URL_INCEPTION_V3}; fetch that file elsewhere and set eval.inception_weights=/path/to/it"
            ) from None
    return resolve_inception_weights(str(hub), cache_dir)


def compute_metrics(
    samples: torch.Tensor, real: torch.Tensor, kind: str, cfg: EvalConfig, device: torch.device | str = "cpu",
    inception_weights: str | None = None, seed: int = 0,
) -> dict[str, float]:
    """FID of ``samples`` against ``real`` and IS of ``samples`` (both [N,C,H,W] in [-1, 1])."""
    import torch_fidelity

    if kind == "digits":
        _register_digits_extractor()
        extractor = {"feature_extractor": DIGITS_EXTRACTOR, "feature_extractor_weights_path": cfg.digits_classifier}
        rgb = False
    else:
        extractor = {"feature_extractor": "inception-v3-compat", "feature_extractor_weights_path": inception_weights}
        rgb = True
    res = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(to_uint8(samples), rgb),
        input2=ImageTensorDataset(to_uint8(real), rgb),
        cuda=torch.device(device).type == "cuda",
        fid=cfg.fid, isc=cfg.isc, isc_splits=cfg.isc_splits, batch_size=cfg.batch_size,
        save_cpu_ram=True, cache=False, verbose=False, rng_seed=seed, **extractor,
    )
    out: dict[str, float] = {}
    if cfg.fid:
        out["fid"] = float(res["frechet_inception_distance"])
    if cfg.isc:
        out["is"] = float(res["inception_score_mean"])
        out["is_std"] = float(res["inception_score_std"])
    return out
