"""FID, IS, KID and precision/recall through torch-fidelity.

RGB models use torch-fidelity's InceptionV3. The embedded digits model uses a small digits classifier
(trained by ``experiments/training/train_digits_classifier.py``) registered in torch-fidelity's own
feature-extractor registry as ``qdiff-digits``: the layer ``eval.digits_feature`` drives FID, KID and
precision/recall, its logits IS.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from qdiff.errors import QDiffError
from qdiff.eval.config import DIGITS_LAYERS, EvalConfig

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
            return (*DIGITS_LAYERS, "features", "logits_unbiased")

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
            out = self.net.layers(x)
            out.update(features=out["fc"], logits_unbiased=out["logits"])  # torch-fidelity's default names
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


class Scorer:
    """FID (with a bootstrap interval), IS, KID and precision/recall of sample sets against one real set,
    all through torch-fidelity's metric functions on features extracted once per set (the real set's once).

    Features: the digits classifier's ``eval.digits_feature`` layer for digits, InceptionV3's 2048-d pool
    features otherwise; IS uses the logits. KID's subset size and IS's splits shrink to fit small sets.
    """

    def __init__(self, real: torch.Tensor, kind: str, cfg: EvalConfig, device: torch.device | str = "cpu",
                 inception_weights: str | None = None, seed: int = 0) -> None:
        from torch_fidelity.utils import create_feature_extractor

        self.cfg, self.seed, self.cuda = cfg, seed, torch.device(device).type == "cuda"
        if kind == "digits":
            _register_digits_extractor()
            name, self.layer, self.rgb = DIGITS_EXTRACTOR, cfg.digits_feature, False
            weights = cfg.digits_classifier
        else:
            name, self.layer, self.rgb, weights = "inception-v3-compat", "2048", True, inception_weights
        self.extractor = create_feature_extractor(name, [self.layer, "logits_unbiased"], cuda=self.cuda, verbose=False,
                                                  feature_extractor_weights_path=weights)
        self.real = self.features(real)[self.layer]
        self.real_stats = fid_features_to_statistics(self.real)
        self.kept: dict[str, torch.Tensor] = {}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        return get_featuresdict_from_dataset(ImageTensorDataset(to_uint8(images), self.rgb), self.extractor,
                                             self.cfg.batch_size, self.cuda, True, False)

    def __call__(self, images: torch.Tensor, keep: str | None = None) -> dict:
        """Every configured metric of ``images``; ``keep`` names the set so that :meth:`feature_record` holds its
        features."""
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        cfg, feats = self.cfg, self.features(images)
        gen = feats[self.layer]
        if keep is not None:
            self.kept[keep] = gen
        out: dict = {}
        if cfg.fid:
            out["fid"] = self.fid(gen)
            if cfg.bootstrap:
                out["fid_ci95"] = self.fid_interval(gen)
        if cfg.isc:
            isc = isc_features_to_metric(feats["logits_unbiased"], splits=min(cfg.isc_splits, len(gen)), rng_seed=self.seed)
            out.update({"is": float(isc["inception_score_mean"]), "is_std": float(isc["inception_score_std"])})
        if cfg.kid:
            size = min(1000, len(gen), len(self.real))
            kid = kid_features_to_metric(gen, self.real, kid_subset_size=size, kid_subsets=100, kid_degree=3,
                                         kid_gamma=None, kid_coef0=1, rng_seed=self.seed, verbose=False)
            out.update({"kid": float(kid["kernel_inception_distance_mean"]), "kid_std": float(kid["kernel_inception_distance_std"])})
        if cfg.prc:
            prc = prc_features_to_metric(gen, self.real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True,
                                         verbose=False)
            out.update({"precision": float(prc["precision"]), "recall": float(prc["recall"])})
        return out

    def fid(self, gen: torch.Tensor) -> float:
        return fid(gen, self.real_stats)

    def fid_interval(self, gen: torch.Tensor) -> list[float]:
        """95 % interval FID +- 1.96 standard errors, the error being the spread of FID over ``eval.bootstrap``
        resamples (with replacement) of the generated set: how much this number moves with the draw of samples.
        (Resampled sets hold duplicates, which inflates each resampled FID; their spread is still the error.)"""
        return bootstrap(lambda idx: self.fid(gen if idx is None else gen[idx]), len(gen), self.cfg.bootstrap, self.seed)[1]

    def recovered_share(self, method: torch.Tensor, linear: torch.Tensor, fp: torch.Tensor,
                        n_boot: int = 200) -> dict:
        """:func:`recovered_share` of three paired sets, given as images or as features of this scorer's layer
        (2-D), against this scorer's real set."""
        def feats(x: torch.Tensor) -> torch.Tensor:
            return x if x.dim() == 2 else self.features(x)[self.layer]

        return recovered_share(feats(method), feats(linear), feats(fp), self.real_stats, n_boot, self.seed)

    def feature_record(self) -> dict[str, torch.Tensor]:
        """What a run keeps so that a report can compute paired statistics without any model: the features of
        the sets scored with ``keep=`` and the real set's FID statistics (float64, as FID uses them)."""
        out = {f"features.{k}": v.contiguous() for k, v in self.kept.items()}
        out.update({f"real.{k}": torch.from_numpy(v) for k, v in self.real_stats.items()})
        return out


def fid(gen: torch.Tensor, real_stats: dict) -> float:
    """FID of generated features against the real set's statistics (torch-fidelity's arithmetic)."""
    return float(fid_statistics_to_metric(fid_features_to_statistics(gen), real_stats, False)["frechet_inception_distance"])


def recovered_share(method: torch.Tensor, linear: torch.Tensor, fp: torch.Tensor, real_stats: dict,
                    n_boot: int = 200, seed: int = 0) -> dict:
    """Share of linear quantization's FID gap that ``method`` closes, 1 - (FID_m - FID_fp) / (FID_lin - FID_fp),
    from the three sets' features, with a paired bootstrap: the sets come from the same noises, so each resample
    draws one set of noise indices and applies it to all three. Interval: point +- 1.96 bootstrap standard
    deviations (``n_boot`` resamples, seeded)."""
    m, lin, f = method, linear, fp
    if not len(m) == len(lin) == len(f):
        raise ValueError(f"recovered_share needs paired sets of equal size, got {len(m)}, {len(lin)}, {len(f)}")

    def share(idx: torch.Tensor | None) -> float:
        fm, fl, ff = (fid(x if idx is None else x[idx], real_stats) for x in (m, lin, f))
        return 1 - (fm - ff) / (fl - ff)

    point, interval = bootstrap(share, len(m), n_boot, seed)
    return {"recovered": round(point, 4), "recovered_ci95": interval, "bootstrap": n_boot}


def bootstrap(stat, n: int, n_boot: int, seed: int = 0) -> tuple[float, list[float]]:
    """``stat(None)`` on the sets as drawn and its interval: +- 1.96 sd of ``stat(idx)`` over ``n_boot``
    resamples ``idx`` of the ``n`` rows (with replacement, seeded)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([stat(torch.randint(0, n, (n,), generator=g)) for _ in range(n_boot)])
    point, half = stat(None), 1.96 * float(values.std())
    return point, [round(point - half, 4), round(point + half, 4)]


def compute_metrics(
    samples: torch.Tensor, real: torch.Tensor, kind: str, cfg: EvalConfig, device: torch.device | str = "cpu",
    inception_weights: str | None = None, seed: int = 0,
) -> dict[str, float]:
    """Every configured metric of ``samples`` against ``real`` (both [N,C,H,W] in [-1, 1]); see :class:`Scorer`."""
    return Scorer(real, kind, cfg, device, inception_weights, seed)(samples)
