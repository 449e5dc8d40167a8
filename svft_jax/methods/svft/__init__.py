"""SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597) — the method's folder: its node, plan,
math and init (`_node.py`), SVD back-ends (`_factorize.py`), and the SVFT-only serving banks
(`banks/`: many coefficient vectors over one set of frozen factors)."""

from svft_jax.methods.svft._node import (
    PrecisionWarning,
    StaticIndices,
    SVFTMeta,
    SVFTNode,
    SVFTPlan,
    apply,
)

__all__ = ["PrecisionWarning", "SVFTMeta", "SVFTNode", "SVFTPlan", "StaticIndices", "apply"]
