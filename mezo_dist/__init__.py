"""mezo_dist: MeZO (zeroth-order fine-tuning with forward passes only) on sharded models."""

from mezo_dist.placement import wrap
from mezo_dist.zo.adaptive import AdaMeZO
from mezo_dist.zo.fzoo import FZOO
from mezo_dist.zo.sparse import SparseMeZO
from mezo_dist.zo.step import MeZO, StepResult

__all__ = ["AdaMeZO", "FZOO", "MeZO", "SparseMeZO", "StepResult", "wrap"]
__version__ = "0.1.0"
