"""Moved to `svft_jax.core._matmul` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.core import _matmul as _moved

sys.modules[__name__] = _moved
