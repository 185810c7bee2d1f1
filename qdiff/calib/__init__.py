"""Timestep-aware calibration data: (T, c, n) schedules, on-disk cache, streaming access."""
from qdiff.calib.config import CalibConfig
from qdiff.calib.data import CalibrationSet, TensorCalibration, calibration_ident, collect_calibration

__all__ = ["CalibConfig", "CalibrationSet", "TensorCalibration", "calibration_ident", "collect_calibration"]
