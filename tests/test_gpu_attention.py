"""decode_attention's CUDA kernels against the NumPy reference (float64 softmax).

Outputs are poisoned with NaN first and every element is checked. The tolerance
is the output dtype's rounding of the result plus a small multiple of the
largest |v| (fp32 accumulation). Runs only on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import w4kern
from w4kern import reference

pytestmark = pytest.mark.gpu

DTYPES = [w4kern.bfloat16, np.float16]
# (Hq, Hkv): GQA ratios 1, 2, 4, 7, 8, 16
HEADS = [(8, 8), (8, 4), (32, 8), (28, 4), (64, 8), (32, 2)]


def poisoned(cp, shape, dtype):
    return cp.full(shape, np.nan, dtype=dtype)


def check(cp, got, q, k, v, lens, block_table=None, scale=None):
    expected = reference.decode_attention(q, k, v, lens, scale=scale, block_table=block_table)
    eps = 2.0 ** -7 if q.dtype == w4kern.bfloat16 else 2.0 ** -10
    vmax = float(np.abs(v.astype(np.float32)).max()) if v.size else 0.0
    tol = eps * np.abs(expected) + 2e-3 * vmax + 1e-6
    got = cp.asnumpy(got).astype(np.float32)
    bad = ~(np.abs(got - expected) <= tol)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} off, first at {np.argwhere(bad)[0]}: got {got[bad][:4]}, "
                           f"expected {expected[bad][:4]}")


def contiguous_case(rng, b, hq, hkv, l_max, d, dtype, lens, q_scale=1.0):
    q = (rng.standard_normal((b, hq, d)) * q_scale).astype(dtype)
    k = rng.standard_normal((b, hkv, l_max, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, l_max, d)).astype(dtype)
    return q, k, v, np.asarray(lens, dtype=np.int32)


def run(cp, q, k, v, lens, **kw):
    out = poisoned(cp, q.shape, q.dtype)
    bt = kw.pop("block_table", None)
    got = w4kern.decode_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(lens), out=out,
                                  block_table=None if bt is None else cp.asarray(bt), **kw)
    assert got is out
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}x{h[1]}")
def test_contiguous_every_head_dim_and_gqa_ratio(cp, rng, dtype, d, heads):
    hq, hkv = heads
    # mixed lengths in one batch: 0, 1, a tile and a bit, not a multiple of anything
    q, k, v, lens = contiguous_case(rng, 3, hq, hkv, 777, d, dtype, [0, 1, 777] if d != 96 else [5, 0, 700])
    for splits in (None, 1, 3):
        check(cp, run(cp, q, k, v, lens, num_splits=splits), q, k, v, lens)


@pytest.mark.parametrize("b", [1, 3, 32])
@pytest.mark.parametrize("splits", [None, 1, 7, 64])
def test_batches_and_split_counts(cp, rng, b, splits):
    lens = rng.integers(0, 1500, b)
    lens[0] = 1500
    q, k, v, lens = contiguous_case(rng, b, 32, 8, 1500, 128, w4kern.bfloat16, lens)
    check(cp, run(cp, q, k, v, lens, num_splits=splits), q, k, v, lens)


@pytest.mark.parametrize("length", [1, 31, 256, 4097, 32768, 131072])
def test_long_contexts(cp, rng, length):
    q, k, v, lens = contiguous_case(rng, 1, 8, 1, length, 128, w4kern.bfloat16, [length])
    check(cp, run(cp, q, k, v, lens), q, k, v, lens)


def test_scores_that_overflow_a_naive_exp(cp, rng):
    """|q . k| * scale in the hundreds: exp without the running max overflows."""
    q, k, v, lens = contiguous_case(rng, 2, 16, 4, 600, 128, np.float16, [600, 333], q_scale=40.0)
    for splits in (1, 5):
        check(cp, run(cp, q, k, v, lens, num_splits=splits), q, k, v, lens)
    check(cp, run(cp, q, k, v, lens, scale=3.0), q, k, v, lens, scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_cache_matches_reference(cp, rng, dtype, page_size):
    b, hq, hkv, d = 4, 32, 8, 128
    lens = np.array([0, 1, 3 * page_size + 5, 1000], dtype=np.int32)
    max_pages = -(-1000 // page_size) + 1
    n_pages = b * max_pages + 3
    k = rng.standard_normal((n_pages, page_size, hkv, d)).astype(dtype)
    v = rng.standard_normal((n_pages, page_size, hkv, d)).astype(dtype)
    table = rng.permutation(n_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    table[0, :] = -1                      # entries past a sequence's pages are never read
    q = rng.standard_normal((b, hq, d)).astype(dtype)
    for splits in (None, 1, 6):
        got = run(cp, q, k, v, lens, block_table=table, num_splits=splits)
        check(cp, got, q, k, v, lens, block_table=table)


def test_out_of_contract_values_never_fault(cp, rng):
    """kv_lens past the cache and wild page indices are the caller's error: the
    kernel clamps them (garbage out, no fault; compute-sanitizer runs this)."""
    q, k, v, _ = contiguous_case(rng, 2, 8, 2, 64, 64, w4kern.bfloat16, [0, 0])
    got = w4kern.decode_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v),
                                  cp.asarray(np.array([10**6, -5], np.int32)))
    cp.cuda.Device().synchronize()
    assert got.shape == q.shape
    table = cp.asarray(np.array([[10**6, -7], [3, 2]], np.int32))
    kp = cp.asarray(rng.standard_normal((4, 16, 2, 64)).astype(w4kern.bfloat16))
    got = w4kern.decode_attention(cp.asarray(q), kp, kp, cp.asarray(np.array([32, 20], np.int32)), block_table=table)
    cp.cuda.Device().synchronize()


def test_debug_mode_checks_values(cp, rng, monkeypatch):
    monkeypatch.setenv("W4KERN_DEBUG", "1")
    q, k, v, _ = contiguous_case(rng, 1, 8, 2, 64, 64, w4kern.bfloat16, [0])
    with pytest.raises(ValueError, match="kv_lens must lie in"):
        w4kern.decode_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(np.array([65], np.int32)))


def test_cuda_graph_replay_gives_eager_bits(cp, rng):
    q, k, v, lens = contiguous_case(rng, 2, 32, 8, 4096, 128, w4kern.bfloat16, [4096, 1234])
    q, k, v, lens = (cp.asarray(a) for a in (q, k, v, lens))
    out = cp.empty(q.shape, dtype=q.dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        eager = w4kern.decode_attention(q, k, v, lens).copy()
        w4kern.decode_attention(q, k, v, lens, out=out)     # sizes the workspace
        stream.begin_capture()
        w4kern.decode_attention(q, k, v, lens, out=out)
        graph = stream.end_capture()
        out.fill(0)
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out).view(np.uint16), cp.asnumpy(eager).view(np.uint16))


def test_repeat_calls_reuse_their_plan_across_workspace_growth(cp, rng):
    # a plan keeps its split-K scratch views: a bigger call in between grows the
    # stream's workspace, and the first shape's later calls (new data, new lengths)
    # must still be right, as must a call on another stream
    small = contiguous_case(rng, 1, 32, 8, 2048, 128, w4kern.bfloat16, [2048])
    big = contiguous_case(rng, 4, 32, 8, 8192, 128, w4kern.bfloat16, [8192, 1, 4000, 8191])
    check(cp, run(cp, *small), *small)
    check(cp, run(cp, *big), *big)
    for lens in ([1999], [1], [0], [2048]):
        q, k, v, _ = contiguous_case(rng, 1, 32, 8, 2048, 128, w4kern.bfloat16, lens)
        lens = np.asarray(lens, dtype=np.int32)
        check(cp, run(cp, q, k, v, lens), q, k, v, lens)
    with cp.cuda.Stream(non_blocking=True):
        check(cp, run(cp, *small), *small)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_shallow_rings_of_gpus_with_less_shared_memory(cp, rng, monkeypatch, paged, d):
    """Where a CTA may have less shared memory than sm_90's 227 KiB (sm_80, sm_89),
    D = 128 takes the 2-stage instance and D = 256 the 1-stage one; this GPU runs
    them when told it offers 100 KB."""
    from w4kern import attention

    # only the ring choice sees the smaller GPU: the loaded kernels keep this one's
    # shared-memory limit (lowering it would fail later launches of deeper rings)
    monkeypatch.setattr(attention, "_cta_smem_optin", lambda device: 100_000)
    monkeypatch.setattr(attention, "_PLANS", {})
    assert attention.ring_stages(d, 100_000) == {128: 2, 256: 1}[d]
    if paged:
        b, page, hkv = 2, 32, 2
        lens = np.array([700, 33], np.int32)
        table = rng.permutation(2 * 23).reshape(2, 23).astype(np.int32)
        k = rng.standard_normal((2 * 23, page, hkv, d)).astype(w4kern.bfloat16)
        v = rng.standard_normal((2 * 23, page, hkv, d)).astype(w4kern.bfloat16)
        q = rng.standard_normal((b, 8, d)).astype(w4kern.bfloat16)
        for splits in (None, 1, 5):
            check(cp, run(cp, q, k, v, lens, block_table=table, num_splits=splits), q, k, v, lens, block_table=table)
    else:
        q, k, v, lens = contiguous_case(rng, 2, 8, 2, 1000, d, np.float16, [1000, 17])
        for splits in (None, 1, 5):
            check(cp, run(cp, q, k, v, lens, num_splits=splits), q, k, v, lens)


def test_many_waves_take_the_shallow_ring(cp, rng):
    """D = 256 at B = 64 is a grid of 1024 CTAs: the 1-stage ring (3 CTAs per SM)
    serves it, and must match the reference like the deep one."""
    from w4kern import attention
    from w4kern._registry import attention_smem_bytes

    lens = rng.integers(0, 300, 64)
    lens[:2] = (300, 1)
    q, k, v, lens = contiguous_case(rng, 64, 32, 16, 300, 256, w4kern.bfloat16, lens)
    check(cp, run(cp, q, k, v, lens), q, k, v, lens)
    smem = [plan[2] for key, plan in attention._PLANS.items() if key[3] == q.shape and key[5] == k.shape]
    assert smem == [attention_smem_bytes(256, 1)]


def test_cp_async_rings_before_sm90(cp, rng, tmp_path, monkeypatch):
    """The rings' cp.async path (what sm_80/sm_89 run) on this GPU: a copy of the
    sources with the copy engine switched off, every head dim, both layouts, deep
    and shallow rings, against the reference."""
    import shutil

    from w4kern import _runtime, attention

    src = tmp_path / "cuda_src"
    shutil.copytree(_runtime.source_dir(), src)
    path = src / "decode_attention.cu"
    text = path.read_text()
    switch = "#define W4KERN_ATTN_COPY_ENGINE (__CUDA_ARCH__ >= 900)"
    assert switch in text
    path.write_text(text.replace(switch, "#define W4KERN_ATTN_COPY_ENGINE 0"))
    monkeypatch.setenv("W4KERN_CUDA_SRC", str(src))
    monkeypatch.setattr(attention, "_PLANS", {})
    for d in (64, 96, 128, 256):
        q, k, v, lens = contiguous_case(rng, 3, 8, 2, 500, d, w4kern.bfloat16, [500, 0, 37])
        for splits in (None, 1, 3):
            check(cp, run(cp, q, k, v, lens, num_splits=splits), q, k, v, lens)
    b, page, hkv, d = 2, 32, 2, 128
    lens = np.array([700, 33], np.int32)
    table = rng.permutation(2 * 23).reshape(2, 23).astype(np.int32)
    k = rng.standard_normal((2 * 23, page, hkv, d)).astype(np.float16)
    v = rng.standard_normal((2 * 23, page, hkv, d)).astype(np.float16)
    q = rng.standard_normal((b, 16, d)).astype(np.float16)
    check(cp, run(cp, q, k, v, lens, block_table=table, num_splits=4), q, k, v, lens, block_table=table)
    monkeypatch.setattr(attention, "_cta_smem_optin", lambda device: 100_000)   # 2- and 1-stage rings
    attention._PLANS.clear()
    for d in (128, 256):
        q, k, v, lens = contiguous_case(rng, 2, 8, 2, 1000, d, np.float16, [1000, 17])
        check(cp, run(cp, q, k, v, lens, num_splits=5), q, k, v, lens)


@pytest.mark.parametrize("splits", [1, 3, 33])
def test_programmatic_launches_give_the_same_bits(cp, rng, monkeypatch, splits):
    """W4KERN_PDL=always: the split kernel and the merge are programmatic dependent
    launches in eager calls too (sm_90+): the split kernel waits for the kernel that
    wrote its q just before it, the merge for the split kernel's partials. The same
    bits as plain launches over many back-to-back calls, which reuse one partials
    buffer."""
    q, k, v, lens = contiguous_case(rng, 2, 32, 8, 2048, 128, w4kern.bfloat16, [2048, 999])
    q, k, v, lens = (cp.asarray(a) for a in (q, k, v, lens))
    monkeypatch.setenv("W4KERN_PDL", "never")
    plain = cp.asnumpy(w4kern.decode_attention(q, k, v, lens, num_splits=splits)).view(np.uint16)
    monkeypatch.setenv("W4KERN_PDL", "always")
    # different inputs back to back, each q written by the kernel just before the
    # call: a split kernel reading q early, or a merge reading early partials, shows
    outs, q2 = [w4kern.decode_attention(q, k, v, lens, num_splits=splits)], []
    for i in range(10):
        q2.append(q * (i + 1))
        outs.append(w4kern.decode_attention(q2[-1], k, v, lens, num_splits=splits))
    np.testing.assert_array_equal(cp.asnumpy(outs[0]).view(np.uint16), plain)
    monkeypatch.setenv("W4KERN_PDL", "never")
    for qi, got in zip(q2, outs[1:]):
        expected = w4kern.decode_attention(qi, k, v, lens, num_splits=splits)
        np.testing.assert_array_equal(cp.asnumpy(got).view(np.uint16), cp.asnumpy(expected).view(np.uint16))
