"""Apache DataSketches sketches built in bulk, with numpy instead of a Python loop per row:
HLL (distinct counts), Theta (distinct sets) and KLL doubles (quantiles), one sketch per group.

HLL: `build_sketches` hashes a whole column at once (DataSketches' MurmurHash3_x64_128, seed 9001,
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

Theta: `build_theta_array` hashes as the Theta update sketch does (the same MurmurHash3,
`h1 >> 1`) and writes each group's compact ordered sketch as a Theta union would leave it:
its lgK-th smallest hashes and theta the next one (exact mode, every hash, up to 2^lgK). A
union of any sketches of a stream, in any order, ends in that same sketch, so batch, speed
and serving agree to the bit after a merge.

KLL: `build_kll_array` writes each group's KLL doubles sketch (k 200) without the random
compactions: the sorted values are cut into consecutive blocks, a level of weight 2^h takes
one value from the middle of each of its blocks of 2^h, and the levels fill from the top
within their capacities. A block straddles any rank at most once, so a rank is off by less
than half the top level's weight (about 0.7 n/k): within KLL's documented error (1.65% at
k 200), exact (every value at weight 1) up to k values. Nulls and NaN are skipped, as
`kll_doubles_sketch.update` skips NaN.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketches import update_theta_sketch

from lambdalake.sketches import KLL_K, LG_K, SEED, THETA_LG_K

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
_COMPACT = 8
_LIST, _SET, _HLL = 0, 1, 2
_HLL_8 = 2 << 2  # target type in the mode byte


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
    group_ids, num_groups = _groups(group_ids, num_groups)
    coupons, valid = _sized(_keys(values, _coupon), group_ids)
    keys = (group_ids[valid].astype(np.uint64) << _U64(32)) | coupons[valid]
    keys.sort()  # by group, then coupon (np.sort is ~40x faster than np.unique here)
    keys = np.concatenate([keys[:1], keys[1:][keys[1:] != keys[:-1]]])
    return _binary_array(*_serialize(keys, num_groups, lg_k))


def _groups(group_ids, num_groups: int | None) -> tuple[np.ndarray, int]:
    group_ids = np.asarray(group_ids, dtype=np.int64)
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if len(group_ids) else 0
    if len(group_ids) and not (group_ids.min() >= 0 and group_ids.max() < num_groups <= 2**32):
        raise ValueError(f"group ids must be in 0..{num_groups - 1} (at most 2^32 groups)")
    return group_ids, num_groups


def _sized(keyed: tuple[np.ndarray, np.ndarray], group_ids: np.ndarray):
    if len(keyed[0]) != len(group_ids):
        raise ValueError("group_ids and values differ in length")
    return keyed


def _binary_array(blob: np.ndarray, offsets: np.ndarray) -> pa.LargeBinaryArray:
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(blob)]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offsets) - 1, buffers)


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
    return _finish(h1, h2, np.full_like(h1, 8))


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


def _keys(values, key_of) -> tuple[np.ndarray, np.ndarray]:
    """(`key_of(h1, h2)` of each value's hash as uint64, mask of the values that count: not
    null, not "")."""
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
        keys, counts = _distinct_keys(arr.dictionary, key_of)
        index = arr.indices.fill_null(0).to_numpy()
        return keys[index], valid & counts[index]
    return _distinct_keys(arr, key_of)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _distinct_keys(arr: pa.Array, key_of) -> tuple[np.ndarray, np.ndarray]:
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
    return key_of(h1, h2), valid


def _coupon(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """The HLL coupon: register value (leading zeros of h2, plus 1) over the low bits of h1."""
    value = np.minimum(_clz64(h2), 62).astype(np.uint64) + _U64(1)
    return (value << _U64(26)) | (h1 & _U64((1 << 26) - 1))


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
        by_sketch = registers.reshape(len(hll), k)
        for lo in range(0, len(hll), 256):  # in slices, to bound the float temporaries
            regs, pos = by_sketch[lo : lo + 256], at[hll[lo : lo + 256]]
            # KxQ0 / KxQ1: sums of 2^-register below / from 32; exact in float64, any order
            _put(out, pos + 16, _INV_LOW[regs].sum(axis=1).astype("<f8"))
            _put(out, pos + 24, _INV_HIGH[regs].sum(axis=1).astype("<f8"))
        _put(out, at[hll] + 32, (k - np.count_nonzero(by_sketch, axis=1)).astype("<u4"))
        for i, pos in enumerate(at[hll].tolist()):  # ~1 us per sketch of >= 385 values
            out[pos + 40 : pos + 40 + k] = by_sketch[i]

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


# -- Theta ---------------------------------------------------------------------------------

_MAX_THETA = (1 << 63) - 1
_THETA_SEED_HASH = update_theta_sketch(THETA_LG_K, seed=SEED).compact().serialize()[6:8]
# compact sketch flags (datasketches-cpp theta_sketch_impl.hpp): read-only, compact, ordered
_THETA_FLAGS, _THETA_EMPTY = 2 | 8 | 16, 4


def build_theta_array(
    group_ids: np.ndarray, values, lg_k: int = THETA_LG_K, num_groups: int | None = None
) -> pa.LargeBinaryArray:
    """One compact ordered Theta sketch per group id 0..num_groups-1 (see the module doc)."""
    group_ids, num_groups = _groups(group_ids, num_groups)
    hashes, valid = _sized(_keys(values, _theta_hash), group_ids)
    valid &= (hashes != 0) & (hashes < _U64(_MAX_THETA))  # what an update sketch refuses
    group, hashes = group_ids[valid], hashes[valid]
    order = np.lexsort((hashes, group))
    group, hashes = group[order], hashes[order]
    fresh = np.ones(len(hashes), bool)
    fresh[1:] = (group[1:] != group[:-1]) | (hashes[1:] != hashes[:-1])
    group, hashes = group[fresh], hashes[fresh]
    count = np.bincount(group, minlength=num_groups)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.arange(len(hashes)) - first[group]
    nominal = 1 << lg_k
    estimating = count > nominal
    theta = np.full(num_groups, _MAX_THETA, np.uint64)
    theta[estimating] = hashes[first[estimating] + nominal]
    kept = rank < nominal
    return _binary_array(*_serialize_theta(group[kept], hashes[kept], theta, nominal))


def _theta_hash(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    return h1 >> _U64(1)


def _serialize_theta(group, hashes, theta, nominal) -> tuple[np.ndarray, np.ndarray]:
    count = np.minimum(np.bincount(group, minlength=len(theta)), nominal)
    estimating = theta < _U64(_MAX_THETA)
    preamble = np.where(estimating, 3, np.where(count <= 1, 1, 2))
    size = 8 * preamble + 8 * count
    start = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    out = np.zeros(start[-1], np.uint8)
    at = start[:-1]
    out[at], out[at + 1], out[at + 2] = preamble, 3, 3  # serial version 3, family compact
    out[at + 5] = np.where(count == 0, _THETA_FLAGS | _THETA_EMPTY, _THETA_FLAGS)
    out[at + 6], out[at + 7] = _THETA_SEED_HASH[0], _THETA_SEED_HASH[1]
    listed = np.flatnonzero(preamble > 1)
    _put(out, at[listed] + 8, count[listed].astype("<u4"))
    _put(out, at[estimating] + 16, theta[estimating].astype("<u8"))
    rank = np.arange(len(group)) - np.concatenate([[0], np.cumsum(count)[:-1]])[group]
    _put(out, at[group] + 8 * preamble[group] + 8 * rank, hashes.astype("<u8"))
    return out, start


# -- KLL -----------------------------------------------------------------------------------

_KLL_M = 8  # the minimum level width
_KLL_FAMILY = 15
_KLL_EMPTY, _KLL_SORTED, _KLL_SINGLE = 1, 2, 4  # flags (datasketches-cpp kll_sketch.hpp)
_KLL_MAX_LEVELS = 61


def build_kll_array(
    group_ids: np.ndarray, values, k: int = KLL_K, num_groups: int | None = None
) -> pa.LargeBinaryArray:
    """One KLL doubles sketch per group id 0..num_groups-1 (see the module doc)."""
    group_ids, num_groups = _groups(group_ids, num_groups)
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    floats = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    if len(floats) != len(group_ids):
        raise ValueError("group_ids and values differ in length")
    valid = ~np.isnan(floats)  # a null reads as NaN here
    group, floats = group_ids[valid], floats[valid]
    order = np.lexsort((floats, group))
    group, floats = group[order], floats[order]
    n = np.bincount(group, minlength=num_groups)
    first = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    levels, counts = _kll_levels(n, k)
    return _binary_array(*_serialize_kll(floats, n, first, levels, counts, k))


@functools.cache
def _kll_capacities(k: int) -> np.ndarray:
    """capacity[L, h]: the items level h holds in a sketch of L levels (kll_helper.hpp)."""
    caps = np.zeros((_KLL_MAX_LEVELS + 1, _KLL_MAX_LEVELS), np.int64)
    for num_levels in range(1, _KLL_MAX_LEVELS + 1):
        for height in range(num_levels):
            depth = num_levels - height - 1
            caps[num_levels, height] = max(_KLL_M, ((2 * k << depth) // 3**depth + 1) >> 1)
    return caps


def _kll_levels(n: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels per group, items per group and level): the fewest levels that hold n, filled
    from the top, each level as full as its capacity and what is left allow."""
    caps = _kll_capacities(k)
    weights = 1 << np.arange(_KLL_MAX_LEVELS, dtype=object)
    most = [int((caps[L, :L].astype(object) * weights[:L]).sum()) for L in range(1, 41)]
    levels = np.searchsorted(np.array(most, np.int64), n) + 1
    counts = np.zeros((len(n), int(levels.max(initial=1))), np.int64)
    left = n.copy()
    for height in range(counts.shape[1] - 1, -1, -1):
        room = np.where(height < levels, caps[levels, np.minimum(height, levels - 1)], 0)
        counts[:, height] = np.minimum(room, left >> height)
        left -= counts[:, height] << height
    return levels, counts


def _serialize_kll(floats, n, first, levels, counts, k) -> tuple[np.ndarray, np.ndarray]:
    full = n > 1
    retained = counts.sum(axis=1)
    size = np.where(full, 20 + 4 * levels + 16 + 8 * retained, np.where(n == 1, 16, 8))
    start = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    out = np.zeros(start[-1], np.uint8)
    at = start[:-1]
    out[at] = np.where(full, 5, 2)  # preamble ints
    out[at + 1] = np.where(n == 1, 2, 1)  # serial version
    out[at + 2] = _KLL_FAMILY
    out[at + 3] = np.where(full, _KLL_SORTED, np.where(n == 1, _KLL_SINGLE, _KLL_EMPTY))
    _put(out, at + 4, np.full(len(n), k, "<u2"))
    out[at + 6] = _KLL_M
    single = np.flatnonzero(n == 1)
    _put(out, at[single] + 8, floats[first[single]].astype("<f8"))
    rows = np.flatnonzero(full)
    if len(rows):
        _write_kll_levels(out, at[rows], floats, n[rows], first[rows], levels[rows],
                          counts[rows], k)
    return out, start


def _write_kll_levels(out, at, floats, n, first, levels, counts, k) -> None:
    caps = _kll_capacities(k)
    _put(out, at + 8, n.astype("<u8"))
    _put(out, at + 16, np.full(len(n), k, "<u2"))
    out[at + 18] = levels
    depth = counts.shape[1]
    total = caps[levels, :depth].sum(axis=1, where=np.arange(depth) < levels[:, None])
    below = np.concatenate([np.zeros((len(n), 1), np.int64), np.cumsum(counts, 1)], axis=1)
    offsets = total[:, None] - below[:, -1:] + below[:, :depth]  # levels_[h]
    slot = np.arange(depth) < levels[:, None]
    _put(out, (at[:, None] + 20 + 4 * np.arange(depth))[slot], offsets[slot].astype("<u4"))
    items = at + 20 + 4 * levels
    _put(out, items, floats[first].astype("<f8"))  # min
    _put(out, items + 8, floats[first + n - 1].astype("<f8"))  # max
    # the sorted values: the top level's blocks first, then each level below
    weight = 1 << np.arange(depth)
    above = np.cumsum((counts * weight)[:, ::-1], axis=1)[:, ::-1] - counts * weight
    row, height = np.nonzero(counts)
    size = counts[row, height]
    seg = np.repeat(np.arange(len(row)), size)
    i = np.arange(len(seg)) - np.repeat(np.cumsum(size) - size, size)
    w = weight[height][seg]
    src = first[row][seg] + above[row, height][seg] + i * w + w // 2
    dst = items[row][seg] + 16 + 8 * (below[row, height][seg] + i)
    _put(out, dst, floats[src].astype("<f8"))
