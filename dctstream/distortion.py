"""Spot positions corrected for the detector's spatial distortion, by ImageD11's own code.

``detector.distortion`` names the distortion in one of the two forms ID11 uses:
a Fit2D spline file (``*.spline``, ImageD11's ``blobcorrector.correctorclass``)
or a pair of maps ``[dx, dy]`` (EDF or any image fabio reads, in detector
pixels (slow, fast): the shift of each pixel along the fast and the slow axis,
ImageD11's ``blobcorrector.detector_spatial``: the map value at the nearest
pixel is added).  The frames stay as they are (difspots in detector pixels);
only the centroids are corrected, into the spot table's ``centroid_x_corrected``
and ``centroid_y_corrected`` columns and the columnfile's ``sc``/``fc``.

ImageD11 is imported only when a distortion is named (``pip install
'dctstream[distortion]'``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .errors import ConfigError, InputError

KEY = "detector.distortion"


class Distortion:
    """``correct(x, y)``: ideal (x, y) of raw centroids, x the column (fast), y the row (slow), 0-based."""

    def __init__(self, spec: str | tuple[str, str], frame_shape: tuple[int, int] | None = None):
        try:
            from ImageD11 import blobcorrector
        except ImportError as exc:
            raise ConfigError(f"{KEY}: correcting spot positions needs ImageD11, expected it installed "
                              f"(pip install 'dctstream[distortion]'), got {exc}") from None
        self.spec = spec
        files = [spec] if isinstance(spec, str) else list(spec)
        for path in files:
            if not os.path.isfile(path):
                raise InputError(f"{KEY}: {path}: file not found, expected a Fit2D spline file or [dx, dy] maps")
        if isinstance(spec, str):
            try:
                with warnings.catch_warnings():  # its advice to prefer dx/dy maps is for ID11's own new data
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._spline = blobcorrector.correctorclass(spec)
            except (SyntaxError, ValueError, IndexError, OSError) as exc:
                raise InputError(f"{KEY}: {spec}: expected a Fit2D spline file (SPATIAL DISTORTION SPLINE "
                                 f"INTERPOLATION COEFFICIENTS ...), got {' '.join(str(exc).split())[:120]}") from None
            self._maps = None
        else:
            try:
                self._maps = blobcorrector.detector_spatial(dxfile=spec[0], dyfile=spec[1])
            except (AssertionError, OSError, ValueError, IOError) as exc:
                raise InputError(f"{KEY}: {spec[0]}, {spec[1]}: expected two images of the same shape (dx, dy "
                                 f"in pixels), got {' '.join(str(exc).split())[:120] or 'different shapes'}") from None
            self._spline = None
        if frame_shape is not None:
            self.check_shape(frame_shape)

    def check_shape(self, frame_shape: tuple[int, int]) -> None:
        """Maps must be of the frames' size (detector pixels, before binning); a spline's valid region must cover
        the frames (beyond it ImageD11 evaluates the spline at its edge: the shift of the edge, not a correction)."""
        if self._maps is None:
            spline = self._spline
            region = [getattr(spline, k, None) for k in ("xmin", "ymin", "xmax", "ymax")]
            if None in region:
                return
            xmin, ymin, xmax, ymax = (float(v) for v in region)
            if xmin > 0 or ymin > 0 or xmax < frame_shape[1] or ymax < frame_shape[0]:
                raise InputError(f"{KEY}: {self.spec}: a spline valid over x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g} "
                                 f"pixels (its VALID REGION), expected one covering the frames of {frame_shape[0]} x "
                                 f"{frame_shape[1]} pixels (y, x): another detector's or binned frames' spline?")
            return
        shape = self._maps.dx.shape
        if tuple(shape) != tuple(frame_shape):
            raise InputError(f"{KEY}: {self.spec[0]}: maps of {shape[0]} x {shape[1]} pixels, expected "
                             f"{frame_shape[0]} x {frame_shape[1]} like the frames")

    def correct(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
        if self._spline is not None:  # ImageD11's order: correct(slow, fast) -> (slow, fast)
            pairs = [self._spline.correct(s, f) for s, f in zip(y, x)]
            sc = np.array([p[0] for p in pairs], np.float64)
            fc = np.array([p[1] for p in pairs], np.float64)
        else:
            peaks = self._maps({"s_raw": y, "f_raw": x}, parallel=False)
            sc, fc = np.asarray(peaks["sc"], np.float64), np.asarray(peaks["fc"], np.float64)
        return fc, sc
