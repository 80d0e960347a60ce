"""Triton kernels of localkv, each with its torch reference (see DESIGN.md, "Kernels").

Every op ``op`` has a launcher ``op(...)`` that checks shapes and runs the Triton kernel when its tensors
are on CUDA (or under ``TRITON_INTERPRET=1``), and ``op_ref(...)``, the plain torch version used on the
CPU and as the test oracle. ``use_triton(*tensors)`` is that decision; ``KERNEL_CALLS`` counts launches.
"""

from ._common import KERNEL_CALLS, use_triton
from .chunk_scores import chunk_scores, chunk_scores_ref, quantize_minmax
from .gather_pages import gather_pages, gather_pages_ref, segment_addresses
from .gather_pinned import gather_pinned, gather_pinned_ref
from .kmeans import kmeans, kmeans_assign, kmeans_assign_ref
from .kv_quant import dequantize_page, dequantize_page_ref, quantize_page, quantize_page_ref
from .lowrank_rope import lowrank_rope, lowrank_rope_ref
from .merge_attention import merge_attention, merge_attention_ref, merge_into, merge_into_ref
from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .rope_append import rope_append, rope_append_ref
from .silu_mul import silu_mul, silu_mul_ref
from .slot_assign import assign_slots, assign_slots_ref
from .sparse_attention import sparse_attention, sparse_attention_ref
from .topk_ids import topk_ids, topk_ids_ref

__all__ = [
    "KERNEL_CALLS", "use_triton",
    "sparse_attention", "sparse_attention_ref",
    "merge_attention", "merge_attention_ref", "merge_into", "merge_into_ref",
    "chunk_scores", "chunk_scores_ref", "quantize_minmax", "topk_ids", "topk_ids_ref", "assign_slots", "assign_slots_ref",
    "lowrank_rope", "lowrank_rope_ref",
    "gather_pinned", "gather_pinned_ref", "gather_pages", "gather_pages_ref", "segment_addresses",
    "rms_norm", "rms_norm_ref", "add_rms_norm", "add_rms_norm_ref", "silu_mul", "silu_mul_ref",
    "rope", "rope_ref", "rope_append", "rope_append_ref",
    "quantize_page", "quantize_page_ref", "dequantize_page", "dequantize_page_ref",
    "kmeans", "kmeans_assign", "kmeans_assign_ref",
]
