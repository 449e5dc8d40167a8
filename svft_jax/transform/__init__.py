"""The SVFT transform: apply, merge, split/combine, masks and summaries over pytrees."""

from svft_jax.transform.apply import apply, select_targets
from svft_jax.transform.factorize import canonicalize_signs, svd_factors
from svft_jax.transform.layout import KernelLayout, resolve_layout
from svft_jax.transform.merge import delta_matrix, left_product, merge, merged_kernel, weight_matrix
from svft_jax.transform.node import AdapterNode, StaticIndices, SVFTMeta, SVFTNode, is_node
from svft_jax.transform.partition import combine, labels, split, trainable_mask
from svft_jax.transform.summary import count_parameters, summary

__all__ = [
    "AdapterNode",
    "KernelLayout",
    "SVFTMeta",
    "SVFTNode",
    "StaticIndices",
    "apply",
    "canonicalize_signs",
    "combine",
    "count_parameters",
    "delta_matrix",
    "is_node",
    "labels",
    "left_product",
    "merge",
    "merged_kernel",
    "resolve_layout",
    "select_targets",
    "split",
    "summary",
    "svd_factors",
    "trainable_mask",
    "weight_matrix",
]
