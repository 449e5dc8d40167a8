"""Moved to `svft_jax.methods.svft` (issue 19: its node and math in `_node.py`, its config and
keyword `apply` in `_config.py`); this path re-exports both for one release (CHANGELOG.md)."""

from svft_jax.methods.svft._config import *  # noqa: F403
from svft_jax.methods.svft._config import _budget_total, _compile_overrides, _solve_budget  # noqa: F401
from svft_jax.methods.svft._node import *  # noqa: F403
from svft_jax.methods.svft._node import _initial_values, _near_repeated, _pattern_indices  # noqa: F401
