"""Moved to `svft_jax.core._partition` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.core import _partition as _moved

sys.modules[__name__] = _moved
