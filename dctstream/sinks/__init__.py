"""Output writers: one DCT difspot file per difspot, the table of all difspots, the corrected frames."""

from .corrected import CorrectedFrameWriter, SparseScan, SparseScanWriter, read_corrected
from .difspots import DifspotWriter
from .spot_table import SpotTable, read_spot_table, spot_row

__all__ = ["CorrectedFrameWriter", "DifspotWriter", "SparseScan", "SparseScanWriter", "SpotTable", "read_corrected", "read_spot_table", "spot_row"]
