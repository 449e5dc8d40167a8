"""Moved to `svft_jax.core._protocol` (issue 19); this path is an alias kept for one release (see CHANGELOG.md)."""

import sys

from svft_jax.core import _protocol as _moved

sys.modules[__name__] = _moved
