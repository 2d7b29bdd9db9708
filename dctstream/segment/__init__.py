"""The streaming double-threshold segmenter (``dctstream.segment(...)`` calls `dctstream.api.segment`)."""

from .segmenter import SegmentParams, Segmenter

__all__ = ["SegmentParams", "Segmenter"]
