"""The validation table on hard scans: see `simulators.validation`.

    python benchmarks/validate.py --quick            # 256 x 256 px, 360 frames: about 20 min on 2 shared cores
    python benchmarks/validate.py --markdown table.md  # 512 x 512 px, 720 frames
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dctstream and simulators

from simulators.validation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
