"""Timestep-aware calibration data: (T, c, n) schedules, on-disk cache, streaming access.

``calibration_data(model, scheduler, sample_shape, T, c, n, cond=...)`` builds a set for any noise predictor;
``collect_calibration`` is the same for a loaded :class:`~qdiff.models.base.DiffusionModel` (the CLI's path).
"""
from qdiff.calib.config import CalibConfig
from qdiff.calib.data import CalibrationSet, TensorCalibration, calibration_ident, collect_calibration
from qdiff.calib.from_model import calibration_data

__all__ = ["CalibConfig", "CalibrationSet", "TensorCalibration", "calibration_data", "calibration_ident",
           "collect_calibration"]
