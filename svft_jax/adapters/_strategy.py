"""Moved to `svft_jax.methods.svft.banks._strategy` (issue 19); an alias of it for one release (CHANGELOG.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("svft_jax.methods.svft.banks._strategy")
