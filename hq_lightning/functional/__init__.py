"""Functional ops: colour space conversions and integer kernels."""

from hq_lightning.functional.color import bgr2centered_yuv as bgr2centered_yuv
from hq_lightning.functional.color import rgb2centered_yuv as rgb2centered_yuv
