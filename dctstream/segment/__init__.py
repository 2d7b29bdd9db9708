"""The streaming double-threshold segmenter."""

import sys
import types

from .segmenter import SegmentParams, Segmenter

__all__ = ["SegmentParams", "Segmenter"]


class _CallableModule(types.ModuleType):
    """Importing this subpackage rebinds ``dctstream.segment``, the public function `dctstream.api.segment`,
    to the subpackage: calling the subpackage calls the function, so ``dctstream.segment(...)`` keeps working."""

    def __call__(self, *args, **kwargs):
        from ..api import segment

        return segment(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
