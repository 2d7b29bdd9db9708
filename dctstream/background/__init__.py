"""Background correction: dark, normalisation, running median along psi, 2-D median filter."""

from .stage import BackgroundStage, window_start

__all__ = ["BackgroundStage", "window_start"]
