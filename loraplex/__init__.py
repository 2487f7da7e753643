"""loraplex: low-rank adapters for any PyTorch model."""

from loraplex.core.config import ConfigError, LoraConfig
from loraplex.core.io import AdapterFileError, load
from loraplex.core.model import AdapterModel, attach
from loraplex.core.targeting import TargetError

__all__ = ["AdapterFileError", "AdapterModel", "ConfigError", "LoraConfig", "TargetError", "attach", "load"]
__version__ = "0.1.0"
