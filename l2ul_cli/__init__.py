"""l2ul: make a trained image classifier forget, or relabel, specific images without retraining.

The library API; the ``l2ul`` command line is a thin layer over these functions.
"""

__version__ = "0.1.0"

from .checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from .config import AttackConfig, UnlearnConfig  # noqa: E402
from .errors import L2ULError  # noqa: E402
from .models import load_model  # noqa: E402
from .workflow import forget, relabel  # noqa: E402

__all__ = [
    "AttackConfig", "L2ULError", "UnlearnConfig", "forget", "load_model", "read_checkpoint", "relabel",
    "write_checkpoint", "__version__",
]
