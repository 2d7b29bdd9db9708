"""Simulated inputs for testing dctstream: DCT scans with ground truth."""

from simulators.dct_scan import ScanModel, ScanTruth, iter_frames, read_truth, simulate_scan

__all__ = ["ScanModel", "ScanTruth", "iter_frames", "read_truth", "simulate_scan"]
