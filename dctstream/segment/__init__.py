"""The streaming double-threshold segmenter."""

from .segmenter import SegmentParams, Segmenter

__all__ = ["SegmentParams", "Segmenter"]
