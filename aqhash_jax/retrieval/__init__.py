"""Retrieval core: code packing, Hamming kernels, retrieval metrics and code files."""

from aqhash_jax.retrieval.codes import num_words, pack_codes, sign_codes, unpack_codes
from aqhash_jax.retrieval.export import CodeFile, check_compatible, compute_fingerprint, load_codes, save_codes
from aqhash_jax.retrieval.hamming import distance_histograms, hamming_distance, hamming_topk, resolve_method
from aqhash_jax.retrieval.metrics import radius_metrics, ranked_metrics, retrieval_metrics, tie_aware_metrics

__all__ = [
    "CodeFile",
    "check_compatible",
    "compute_fingerprint",
    "distance_histograms",
    "hamming_distance",
    "hamming_topk",
    "load_codes",
    "num_words",
    "pack_codes",
    "radius_metrics",
    "ranked_metrics",
    "resolve_method",
    "retrieval_metrics",
    "save_codes",
    "sign_codes",
    "tie_aware_metrics",
    "unpack_codes",
]
