"""Functional ops: colour space conversions and integer kernels."""

from hq_lightning.functional.color import bgr2centered_yuv as bgr2centered_yuv
from hq_lightning.functional.color import centered_yuv2bgr as centered_yuv2bgr
from hq_lightning.functional.color import centered_yuv2rgb as centered_yuv2rgb
from hq_lightning.functional.color import rgb2centered_yuv as rgb2centered_yuv
