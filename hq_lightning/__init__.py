"""hq_lightning: quantization-aware training for BPU-family int8/int16 accelerators.

The public module paths mirror ``horizon_plugin_pytorch`` so user code runs after replacing the
package name. This top-level package imports neither Lightning nor Hydra.
"""

from hq_lightning.dtype import qint8, qint16, qint32
from hq_lightning.march import March, get_march, set_march

__all__ = ["March", "get_march", "set_march", "qint8", "qint16", "qint32", "__version__"]
__version__ = "0.1.0"

# ``import hq_lightning as horizon; horizon.quantization.fuse_fx(...)`` as in the plugin's docs:
# the core subpackages load on first attribute access (never callbacks/cli, which need Lightning).
_SUBPACKAGES = ("functional", "nn", "qconfig", "quantization", "utils")


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
