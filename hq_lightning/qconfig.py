"""Named default qconfigs (``hq_lightning.qconfig`` mirrors the plugin's top-level alias)."""

from hq_lightning.quantization.qconfig import *  # noqa: F403
from hq_lightning.quantization.qconfig import __all__  # noqa: F401
