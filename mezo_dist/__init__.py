"""mezo_dist: MeZO (zeroth-order fine-tuning with forward passes only) on sharded models."""

from mezo_dist.placement import wrap
from mezo_dist.zo.step import MeZO, StepResult

__all__ = ["MeZO", "StepResult", "wrap"]
__version__ = "0.1.0"
