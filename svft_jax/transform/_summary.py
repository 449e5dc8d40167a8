"""Moved to `svft_jax.core._summary` (issue 19); an alias of it for one release (CHANGELOG.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("svft_jax.core._summary")
