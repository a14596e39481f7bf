"""The device mesh (dp x ep), process groups and gradient sync rules."""

from .config import ParallelConfig
from .errors import CollectiveError
from .state import ParallelState, init_parallel, is_expert_param

__all__ = ["CollectiveError", "ParallelConfig", "ParallelState", "init_parallel", "is_expert_param"]
