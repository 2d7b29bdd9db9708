"""dctstream: live background correction and difspot segmentation for DCT scans."""

__version__ = "0.1.0"
