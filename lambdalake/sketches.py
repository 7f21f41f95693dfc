"""Apache DataSketches sketches as bytes: the parameters and formats every engine shares (HLL
for distinct counts, Theta for distinct sets, KLL doubles for quantiles), and what a metric
kind does with one sketch at a time. Sketches built in bulk, a column at once: `sketch_arrays`.

HLL sketches are read out of order (`estimate`): an answer is a function of the coupons
alone, the same for every engine, partition and merge order.
"""

from __future__ import annotations

from collections.abc import Iterable

from datasketches import hll_sketch, hll_union, tgt_hll_type

LG_K = 12
THETA_LG_K = 12  # 4096 hashes kept: exact up to 4096 distinct values, 1.6% error beyond
KLL_K = 200  # normalized rank error 1.65%
SEED = 9001
OUT_OF_ORDER = 16  # the HLL preamble's flag (byte 5) of a sketch with no HIP accumulator


def empty(lg_k: int = LG_K) -> bytes:
    return hll_sketch(lg_k, tgt_hll_type.HLL_8).serialize_compact()


def merge(sketches: Iterable[bytes | None], lg_k: int = LG_K) -> bytes:
    union = hll_union(lg_k)
    for sketch in sketches:
        if sketch is not None:
            union.update(hll_sketch.deserialize(bytes(sketch)))
    return union.get_result(tgt_hll_type.HLL_8).serialize_compact()


def estimate(sketch: bytes | None) -> float:
    """Distinct count; exact below 385 values (lgK 12). Read out of order (see module doc)."""
    if sketch is None:
        return 0.0
    flagged = bytearray(sketch)
    flagged[5] |= OUT_OF_ORDER
    return hll_sketch.deserialize(bytes(flagged)).get_estimate()
