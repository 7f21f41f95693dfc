"""Apache DataSketches HLL sketches built in bulk, with numpy instead of a Python loop per row.

`build_sketches` hashes a whole column at once (DataSketches' MurmurHash3_x64_128, seed 9001,
vectorized), turns each hash into its coupon, dedups the coupons per group and writes each
group's sketch directly in the DataSketches serialization (HLL_8 target, compact): LIST mode
below 8 distinct coupons, SET mode up to 3/4 * 2^(lgK-3) (384 for lgK 12), HLL mode beyond.
The result has the same coupons and registers as a sketch fed the values one by one, so it is
read by the `datasketches` package and by Spark's `hll_union_agg` / `hll_sketch_estimate`.

Values hash as the `datasketches` package and Spark's `hll_sketch_agg` hash them: integers as
int64 (so an int and a bigint column agree), floats as their canonical double bits, strings as
UTF-8 bytes; nulls and empty strings are skipped. HLL-mode sketches built here carry no HIP
accumulator (it depends on the order of the rows) and are flagged out of order, like every
union result; `estimate` reads every sketch that way, so the answer is a function of the
coupons alone: the same for every engine, partition and merge order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketches import hll_sketch, hll_union, tgt_hll_type

LG_K = 12
SEED = 9001
_CHUNK = 1 << 20

_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_U64 = np.uint64
_INV_LOW = np.where(np.arange(64) < 32, np.ldexp(1.0, -np.arange(64)), 0.0)
_INV_HIGH = np.where(np.arange(64) < 32, 0.0, np.ldexp(1.0, -np.arange(64)))
_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(9)], np.uint64)  # low n bytes

# Serialization constants (datasketches-cpp hll/include/HllUtil.hpp).
_COMPACT, _OUT_OF_ORDER = 8, 16
_LIST, _SET, _HLL = 0, 1, 2
_HLL_8 = 2 << 2  # target type in the mode byte


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
    flagged[5] |= _OUT_OF_ORDER
    return hll_sketch.deserialize(bytes(flagged)).get_estimate()


def build_sketches(
    group_ids: np.ndarray, values, lg_k: int = LG_K, num_groups: int | None = None
) -> list[bytes]:
    """One compact HLL_8 sketch per group id 0..num_groups-1 (default max id + 1).

    `values`: a pyarrow array / chunked array (dictionary-encoded too), numpy array or list
    of str, int or float, as long as `group_ids`.
    """
    return build_sketch_array(group_ids, values, lg_k, num_groups).to_pylist()


def build_sketch_array(
    group_ids: np.ndarray, values, lg_k: int = LG_K, num_groups: int | None = None
) -> pa.LargeBinaryArray:
    """`build_sketches` as an Arrow array (zero-copy; for DuckDB / Parquet writers)."""
    if not 4 <= lg_k <= 21:
        raise ValueError(f"lg_k must be in 4..21, got {lg_k}")
    group_ids = np.asarray(group_ids, dtype=np.int64)
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    if len(group_ids) and not (group_ids.min() >= 0 and group_ids.max() < num_groups <= 2**32):
        raise ValueError(f"group ids must be in 0..{num_groups - 1} (at most 2^32 groups)")
    coupons, valid = _coupons(values)
    if len(coupons) != len(group_ids):
        raise ValueError("group_ids and values differ in length")
    keys = (group_ids[valid].astype(np.uint64) << _U64(32)) | coupons[valid]
    keys.sort()  # by group, then coupon (np.sort is ~40x faster than np.unique here)
    keys = np.concatenate([keys[:1], keys[1:][keys[1:] != keys[:-1]]])
    blob, offsets = _serialize(keys, num_groups, lg_k)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(blob)]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), num_groups, buffers)


# -- hashing -------------------------------------------------------------------------------


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def _mix_k1(k1: np.ndarray) -> np.ndarray:
    return _rotl(k1 * _C1, 31) * _C2


def _mix_k2(k2: np.ndarray) -> np.ndarray:
    return _rotl(k2 * _C2, 33) * _C1


def _fmix(k: np.ndarray) -> np.ndarray:
    k = (k ^ (k >> _U64(33))) * _FMIX1
    k = (k ^ (k >> _U64(33))) * _FMIX2
    return k ^ (k >> _U64(33))


def _finish(h1: np.ndarray, h2: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h1 ^= length
    h2 ^= length
    h1 += h2
    h2 += h1
    h1, h2 = _fmix(h1), _fmix(h2)
    h1 += h2
    h2 += h1
    return h1, h2


def _hash_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MurmurHash3_x64_128 of 8-byte little-endian values (uint64 array)."""
    h1 = _U64(SEED) ^ _mix_k1(words)
    h2 = np.full_like(h1, SEED)
    return _finish(h1, h2, _U64(8))


def _hash_strings(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """MurmurHash3_x64_128 of each string's UTF-8 bytes, in chunks to bound memory."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(16, np.uint8)])  # tails may read past the end
    starts, ends = offsets[:-1], offsets[1:]
    parts = [
        _hash_bytes(data, starts[i : i + _CHUNK], ends[i : i + _CHUNK])
        for i in range(0, len(arr), _CHUNK)
    ]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _hash_bytes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    # words[i] = the 8 bytes at data[i:i+8], little-endian (an unaligned, overlapping view)
    words = np.ndarray((len(data) - 7,), "<u8", data, 0, (1,))
    lengths = ends - starts
    nblocks = lengths >> 4
    h1 = np.full(len(starts), SEED, np.uint64)
    h2 = h1.copy()
    for block in range(int(nblocks.max(initial=0))):
        rows = np.flatnonzero(nblocks > block)
        at = starts[rows] + 16 * block
        a = h1[rows] ^ _mix_k1(words[at])
        a = _rotl(a, 27) + h2[rows]
        a = a * _U64(5) + _U64(0x52DCE729)
        b = h2[rows] ^ _mix_k2(words[at + 8])
        b = _rotl(b, 31) + a
        h1[rows], h2[rows] = a, b * _U64(5) + _U64(0x38495AB5)
    at = starts + (nblocks << 4)
    rem = lengths & 15
    # a zero word mixes to zero: no branch on the tail length
    h1 ^= _mix_k1(words[at] & _MASKS[np.minimum(rem, 8)])
    h2 ^= _mix_k2(words[at + 8] & _MASKS[np.maximum(rem - 8, 0)])
    return _finish(h1, h2, lengths.astype(np.uint64))


def _clz64(x: np.ndarray) -> np.ndarray:
    """Leading zeros of uint64 values, exactly (float64 holds 32-bit halves exactly)."""
    hi = (x >> _U64(32)).astype(np.float64)
    lo = (x & _U64(0xFFFFFFFF)).astype(np.float64)
    return np.where(hi > 0, 32 - np.frexp(hi)[1], 64 - np.frexp(lo)[1])


def _coupons(values) -> tuple[np.ndarray, np.ndarray]:
    """(coupon per value as uint64, mask of the values that count: not null, not "")."""
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    valid = arr.is_valid().to_numpy(zero_copy_only=False).copy()
    t = arr.type
    if pa.types.is_null(t) or not valid.any():
        return np.zeros(len(arr), np.uint64), np.zeros(len(arr), bool)
    if _is_text(t):  # hashing a string costs ~10x a lookup, and values repeat
        arr = pc.dictionary_encode(arr)
        t = arr.type
    if pa.types.is_dictionary(t):  # hash each distinct value once
        coupons, counts = _distinct_coupons(arr.dictionary)
        index = arr.indices.fill_null(0).to_numpy()
        return coupons[index], valid & counts[index]
    return _distinct_coupons(arr)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _distinct_coupons(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    valid = arr.is_valid().to_numpy(zero_copy_only=False).copy()
    t = arr.type
    with np.errstate(over="ignore"):
        if _is_text(t):
            arr = arr.cast(pa.large_string())
            valid &= pc.binary_length(arr).fill_null(0).to_numpy() > 0
            h1, h2 = _hash_strings(arr)
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            h1, h2 = _hash_words(arr.cast(pa.int64()).fill_null(0).to_numpy().view(np.uint64))
        elif pa.types.is_floating(t):
            floats = arr.cast(pa.float64()).fill_null(0.0).to_numpy() + 0.0  # -0.0 -> 0.0
            words = floats.view(np.uint64).copy()
            words[np.isnan(floats)] = 0x7FF8000000000000  # Java's canonical NaN
            h1, h2 = _hash_words(words)
        else:
            raise TypeError(f"cannot sketch values of type {t}")
    value = np.minimum(_clz64(h2), 62).astype(np.uint64) + _U64(1)
    return (value << _U64(26)) | (h1 & _U64((1 << 26) - 1)), valid


# -- serialization -------------------------------------------------------------------------


def _serialize(keys: np.ndarray, num_groups: int, lg_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(all sketches back to back, their int64 start offsets plus the end)."""
    group = (keys >> _U64(32)).astype(np.int64)
    coupon = (keys & _U64(0xFFFFFFFF)).astype(np.uint32)
    count = np.bincount(group, minlength=num_groups)[:num_groups]
    first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    k = 1 << lg_k
    set_max = 3 * (k >> 3) // 4 if lg_k > 7 else 7  # SET mode needs lgK > 7
    mode = np.where(count < 8, _LIST, np.where(count <= set_max, _SET, _HLL))
    header = np.choose(mode, [8, 12, 40])
    body = np.where(mode == _HLL, k, 4 * count)
    size = np.where(count == 0, 8, header + body)
    start = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    out = np.zeros(start[-1], np.uint8)
    at = start[:-1]

    out[at] = np.choose(mode, [2, 3, 10])  # preamble ints
    out[at + 1], out[at + 2], out[at + 3] = 1, 7, lg_k  # serial version, family, lgK
    out[at + 4] = np.where(mode == _LIST, 3, np.where(mode == _SET, _lg_set_size(count), 0))
    out[at + 5] = np.where(count == 0, 4 | _COMPACT, np.where(mode == _HLL, 24, _COMPACT))
    out[at + 6] = np.where(mode == _LIST, count, 0)  # list count; HLL curMin is 0
    out[at + 7] = mode | _HLL_8
    sets = np.flatnonzero(mode == _SET)
    _put(out, at[sets] + 8, count[sets].astype("<u4"))

    # coupons of LIST / SET groups, in ascending order
    small = mode[group] != _HLL
    rank = np.arange(len(coupon)) - first[group]
    dst = at[group[small]] + header[group[small]] + 4 * rank[small]
    _put(out, dst, coupon[small].astype("<u4"))

    hll = np.flatnonzero(mode == _HLL)
    if len(hll):
        row = np.full(num_groups, -1, np.int64)
        row[hll] = np.arange(len(hll))
        big = row[group] >= 0
        registers = np.zeros(len(hll) * k, np.uint8)
        slot = row[group[big]] * k + (coupon[big] & (k - 1))
        np.maximum.at(registers, slot, (coupon[big] >> 26).astype(np.uint8))
        registers = registers.reshape(len(hll), k)
        for lo in range(0, len(hll), 256):  # in slices, to bound the float temporaries
            regs, pos = registers[lo : lo + 256], at[hll[lo : lo + 256]]
            # KxQ0 / KxQ1: sums of 2^-register below / from 32; exact in float64, any order
            _put(out, pos + 16, _INV_LOW[regs].sum(axis=1).astype("<f8"))
            _put(out, pos + 24, _INV_HIGH[regs].sum(axis=1).astype("<f8"))
        _put(out, at[hll] + 32, (k - np.count_nonzero(registers, axis=1)).astype("<u4"))
        for i, pos in enumerate(at[hll].tolist()):  # ~1 us per sketch of >= 385 values
            out[pos + 40 : pos + 40 + k] = registers[i]

    return out, start


def _lg_set_size(count: np.ndarray) -> np.ndarray:
    """HllUtil::computeLgArrInts(SET, count): the hash set's size after growing to `count`."""
    lg = np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64)
    lg += 4 * count > 3 * (1 << lg)
    return np.maximum(lg, 5)


def _put(out: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """Write fixed-width little-endian `values` at byte offsets `at`."""
    width = values.dtype.itemsize
    out[at[:, None] + np.arange(width)] = values.view(np.uint8).reshape(-1, width)
