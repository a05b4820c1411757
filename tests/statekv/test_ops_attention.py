"""Tests for statekv/ops: the torch reference, the SDPA fast path and the Triton kernels (interpreted on CPU)."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton import: triton.jit reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from statekv.ops import attention, attention_reference, attention_sdpa

# (B, H, Hkv, q, kv, D, block_q)
REFERENCE_SHAPES = [
    (1, 4, 4, 8, 8, 16, 128),  # text prefix: q == kv, plain causal, MHA
    (2, 4, 2, 5, 13, 16, 2),  # chunk after prefix/state, GQA 2, block_q < q with a tail block
    (1, 8, 2, 1, 9, 32, 128),  # decoding one token: every key open, GQA 4
    (1, 4, 1, 7, 7, 8, 3),  # causal, GQA 4, tail block
    (2, 6, 3, 11, 30, 16, 4),  # GQA 2, nothing a multiple of the block
]


def naive_attention(query, key, value, scaling):
    """Full-matrix attention with repeated K/V: (out [B, q, H, D], scores [B, Hkv, kv]) in float32."""
    B, H, q_len, D = query.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    G = H // Hkv
    k = key.float().repeat_interleave(G, dim=1)  # (B, H, kv, D)
    v = value.float().repeat_interleave(G, dim=1)
    s = scaling * query.float() @ k.transpose(-1, -2)  # (B, H, q, kv)
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    s = s.masked_fill(j > kv_len - q_len + i, float("-inf"))
    p = s.softmax(-1)
    out = (p @ v).transpose(1, 2)  # (B, q, H, D)
    scores = p.view(B, Hkv, G, q_len, kv_len).sum(dim=(2, 3))  # (B, Hkv, kv)
    return out, scores


def make_qkv(B, H, Hkv, q_len, kv_len, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H, q_len, D, generator=g).to(dtype)
    key = torch.randn(B, Hkv, kv_len, D, generator=g).to(dtype)
    value = torch.randn(B, Hkv, kv_len, D, generator=g).to(dtype)
    return query, key, value


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_reference_matches_naive(shape):
    B, H, Hkv, q_len, kv_len, D, block_q = shape
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D)
    out, scores = attention_reference(query, key, value, scaling=D**-0.5, key_scores=True, block_q=block_q)
    want_out, want_scores = naive_attention(query, key, value, D**-0.5)
    assert out.shape == (B, q_len, H, D) and out.dtype == query.dtype
    assert scores.shape == (B, Hkv, kv_len) and scores.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_scores_sum_to_queries_times_group(shape):
    """Every query row is a distribution over keys, so each group's mass is q * H / Hkv."""
    B, H, Hkv, q_len, kv_len, D, block_q = shape
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D)
    _, scores = attention_reference(query, key, value, scaling=D**-0.5, key_scores=True, block_q=block_q)
    torch.testing.assert_close(scores.sum(-1), torch.full((B, Hkv), q_len * H / Hkv), atol=1e-4, rtol=1e-5)


def test_masked_keys_get_no_mass():
    """Chunk key j is seen only by queries i >= j - (kv - q): the last key gets exactly one query per head."""
    query, key, value = make_qkv(1, 4, 2, 6, 10, 16)
    _, scores = attention_reference(query, key, value, scaling=0.25, key_scores=True, block_q=4)
    assert (scores > 0).all()
    assert (scores[..., -1] <= 2 + 1e-6).all()  # one query, 2 heads per group, probability <= 1 each


def test_key_scores_off_returns_none():
    query, key, value = make_qkv(1, 2, 1, 3, 5, 16)
    assert attention_reference(query, key, value, scaling=0.25)[1] is None
    assert attention(query, key, value, scaling=0.25)[1] is None


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_sdpa_matches_reference(shape):
    """Regression: SDPA's is_causal aligns top-left, wrong when kv > q; the fast path must use the chunk mask."""
    B, H, Hkv, q_len, kv_len, D, _ = shape
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D)
    want, _ = attention_reference(query, key, value, scaling=D**-0.5)
    torch.testing.assert_close(attention_sdpa(query, key, value, scaling=D**-0.5), want, atol=1e-5, rtol=1e-5)
    out, scores = attention(query, key, value, scaling=D**-0.5, backend="torch")
    assert scores is None
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_uses_torch_and_accepts_transposed_query():
    """transformers hands over query as a transposed [B, q, H, D] view; every path must honour its strides."""
    B, H, Hkv, q_len, kv_len, D = 1, 4, 2, 6, 11, 16
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D)
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not query_t.is_contiguous()
    want_out, want_scores = naive_attention(query, key, value, 0.25)
    out, scores = attention(query_t, key, value, scaling=0.25, key_scores=True, block_q=4)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_reference_memory_is_one_query_block():
    """No intermediate of the reference may be larger than one block of scores, B * H * block_q * kv."""
    B, H, Hkv, q_len, kv_len, D, block_q = 1, 4, 2, 64, 80, 4, 4
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D)
    with LargestTensor() as mode:
        attention_reference(query, key, value, scaling=0.5, key_scores=True, block_q=block_q)
    assert 0 < mode.largest <= B * H * block_q * kv_len < B * H * q_len * kv_len
    with LargestTensor() as mode:  # the mode does see a full score matrix when one is made
        naive_attention(query, key, value, 0.5)
    assert mode.largest >= B * H * q_len * kv_len


@pytest.mark.parametrize(
    "q_shape, kv_shape, match",
    [
        ((4, 8, 16), (1, 2, 8, 16), "4-D"),
        ((1, 3, 4, 16), (1, 2, 8, 16), "multiple"),
        ((1, 4, 9, 16), (1, 2, 8, 16), "must be >= query length"),
        ((1, 4, 4, 16), (1, 2, 8, 32), "head_dim"),
        ((2, 4, 4, 16), (1, 2, 8, 16), "batch"),
        ((1, 4, 0, 16), (1, 2, 8, 16), ">= 1"),
    ],
)
def test_bad_shapes_raise(q_shape, kv_shape, match):
    query, key = torch.randn(q_shape), torch.randn(kv_shape)
    for fn in (attention, attention_reference, attention_sdpa):
        with pytest.raises(ValueError, match=match):
            fn(query, key, key.clone(), scaling=1.0)


def test_bad_inputs_raise():
    query, key, value = make_qkv(1, 4, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="key and value shapes differ"):
        attention(query, key, value[:, :, :7], scaling=1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(query, key, value.half(), scaling=1.0)
    with pytest.raises(ValueError, match="block_q"):
        attention_reference(query, key, value, scaling=1.0, block_q=0)
    with pytest.raises(ValueError, match="valid backends: auto, torch, triton"):
        attention(query, key, value, scaling=1.0, backend="flash")


def test_works_without_triton():
    """statekv.ops must import and run (torch backend) where triton is absent; it imports triton lazily."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch\n"
        "from statekv.ops import attention\n"
        "q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 5, 16)\n"
        "out, scores = attention(q, k, k, scaling=0.25, key_scores=True)\n"
        "assert out.shape == (1, 3, 2, 16) and scores.shape == (1, 1, 5)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env=env)


# Triton, interpreted on CPU. (B, H, Hkv, q, kv, D, block_m, block_n)
TRITON_SHAPES = [
    (1, 4, 2, 20, 37, 16, 16, 16),  # GQA 2, tails in q and kv, several key blocks
    (2, 4, 1, 33, 33, 32, 16, 16),  # causal prefix, GQA 4, q tail
    (1, 2, 2, 1, 19, 16, 16, 16),  # decoding one token
    (1, 2, 1, 9, 21, 24, 16, 16),  # head_dim 24 padded to 32
    (1, 4, 2, 40, 100, 64, None, None),  # default block sizes
]


@pytest.fixture(scope="module")
def triton_ops():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    from statekv.ops import triton_attention

    return triton_attention


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(triton_ops, shape):
    B, H, Hkv, q_len, kv_len, D, block_m, block_n = shape
    query, key, value = (t.to(_device()) for t in make_qkv(B, H, Hkv, q_len, kv_len, D))
    scaling = D**-0.5
    out, lse = triton_ops.flash_forward(query, key, value, scaling=scaling, block_m=block_m, block_n=block_n)
    scores = triton_ops.key_scores_from_lse(query, key, lse, scaling=scaling, block_m=block_m, block_n=block_n)
    want_out, want_scores = attention_reference(query, key, value, scaling=scaling, key_scores=True, block_q=8)
    k = key.repeat_interleave(H // Hkv, dim=1)
    s = scaling * query @ k.transpose(-1, -2)  # (B, H, q, kv)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    want_lse = s.masked_fill(~visible, float("-inf")).logsumexp(-1)  # (B, H, q)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)


def test_triton_bfloat16(triton_ops):
    B, H, Hkv, q_len, kv_len, D = 1, 4, 2, 20, 37, 32
    query, key, value = (t.to(_device()) for t in make_qkv(B, H, Hkv, q_len, kv_len, D, dtype=torch.bfloat16))
    out, scores = triton_ops.attention_triton(
        query, key, value, scaling=D**-0.5, key_scores=True, block_m=16, block_n=16
    )
    want_out, want_scores = attention_reference(query, key, value, scaling=D**-0.5, key_scores=True)
    assert out.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(scores, want_scores, atol=1e-3, rtol=1e-3)


def test_attention_dispatches_to_triton(triton_ops):
    B, H, Hkv, q_len, kv_len, D = 1, 4, 2, 6, 11, 16
    query, key, value = (t.to(_device()) for t in make_qkv(B, H, Hkv, q_len, kv_len, D))
    query = query.transpose(1, 2).contiguous().transpose(1, 2)  # strided like transformers' query
    out, scores = attention(query, key, value, scaling=0.25, key_scores=True, backend="triton")
    want_out, want_scores = attention_reference(query, key, value, scaling=0.25, key_scores=True)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    out, scores = attention(query, key, value, scaling=0.25, backend="triton")
    assert scores is None
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)


def test_triton_rejects_bad_block_sizes_and_head_dim(triton_ops):
    query, key, value = make_qkv(1, 2, 1, 4, 8, 16)
    with pytest.raises(ValueError, match="power of two"):
        triton_ops.attention_triton(query, key, value, scaling=1.0, block_m=24)
    query, key, value = make_qkv(1, 2, 1, 4, 8, 320)
    with pytest.raises(ValueError, match="head_dim 320"):
        triton_ops.attention_triton(query, key, value, scaling=1.0)


# --- the denormal-free softmax of the torch key-score path --------------------------------------------------------

TINY = torch.finfo(torch.float32).tiny


def float64_attention(query, key, value, scaling):
    """The plain softmax in float64 (no threshold): (out [B, q, H, D], scores [B, Hkv, kv]) as float64."""
    return naive_attention_dtype(query.double(), key.double(), value.double(), scaling)


def naive_attention_dtype(query, key, value, scaling):
    B, H, q_len, D = query.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    G = H // Hkv
    k = key.repeat_interleave(G, dim=1)  # (B, H, kv, D)
    v = value.repeat_interleave(G, dim=1)
    s = scaling * query @ k.transpose(-1, -2)  # (B, H, q, kv)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2), p.view(B, Hkv, G, q_len, kv_len).sum(dim=(2, 3))


def peaked_qkv(B, H, Hkv, q_len, kv_len, D, spread=6.0, seed=0):
    """Inputs whose logits span hundreds: a float32 softmax of them has many subnormal probabilities."""
    query, key, value = make_qkv(B, H, Hkv, q_len, kv_len, D, seed=seed)
    return query * spread, key * spread, value


def subnormal_count(t: torch.Tensor) -> int:
    """Number of values strictly between 0 and the smallest normal float32 in magnitude."""
    a = t.detach().abs()
    return int(((a > 0) & (a < TINY)).sum())


UNINITIALISED = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                 torch.ops.aten.new_empty)


class SubnormalOutputs(TorchDispatchMode):
    """Counts subnormal values in every float32 tensor an op computes (not uninitialised buffers, not views)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in UNINITIALISED:
            return result
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype == torch.float32:
                self.count += subnormal_count(t)
        return result


# (B, H, Hkv, q, kv, D, block_q, spread)
FUSED_SHAPES = [
    (1, 8, 4, 24, 90, 16, 8, 1.0),  # a chunk after prefix | state, GQA 2, three full query blocks
    (2, 6, 2, 13, 40, 16, 5, 1.0),  # GQA 3, a tail block (13 = 5 + 5 + 3)
    (1, 4, 4, 9, 9, 32, 4, 1.0),  # the text prefix: q == kv, plain causal, MHA
    (1, 8, 2, 1, 30, 16, 128, 1.0),  # decoding one token, GQA 4
    (1, 8, 4, 24, 90, 16, 8, 6.0),  # peaked: logits span hundreds
    (2, 4, 1, 17, 50, 32, 6, 8.0),  # peaked, GQA 4, tail block
]


@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_torch_path_equals_float64_softmax(shape):
    """Output and key scores equal a float64 softmax; the probabilities the threshold drops are below
    `probability_floor` (< 4.5 * kv**2 * tiny per query row), far under the float32 tolerance used here."""
    B, H, Hkv, q_len, kv_len, D, block_q, spread = shape
    query, key, value = peaked_qkv(B, H, Hkv, q_len, kv_len, D, spread=spread)
    scaling = D**-0.5
    want_out, want_scores = float64_attention(query, key, value, scaling)
    for backend_call in (
        lambda: attention_reference(query, key, value, scaling=scaling, key_scores=True, block_q=block_q),
        lambda: attention(query, key, value, scaling=scaling, key_scores=True, block_q=block_q, backend="torch"),
    ):
        out, scores = backend_call()
        assert out.dtype == torch.float32 and scores.dtype == torch.float32
        # peaked logits are ~|q||k|: float32 rounding of a logit of a few hundred moves its probability ~1e-5
        tol = 1e-5 if spread == 1.0 else 1e-3
        torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(scores.double(), want_scores, atol=tol * q_len, rtol=tol)
        # each query row still sums to 1: the mass the threshold drops is below float32 resolution
        torch.testing.assert_close(scores.double().sum(-1), torch.full((B, Hkv), q_len * H / Hkv, dtype=torch.float64),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("spread", [6.0, 8.0])
def test_torch_path_produces_no_subnormals(spread):
    """Regression: the explicit float32 softmax of the key-score path produced subnormal probabilities when
    attention was peaked, and a CPU's subnormal (and underflowing) exp is ~10-40x slower than a normal one, which
    made StateKV's prefill slower than the one-shot forward (issue #21). No op of the torch path may return a
    subnormal float32, and the process's floating-point mode (flush-to-zero) must be left as it was."""
    B, H, Hkv, q_len, kv_len, D = 1, 8, 4, 24, 90, 16
    query, key, value = peaked_qkv(B, H, Hkv, q_len, kv_len, D, spread=spread)
    scaling = D**-0.5
    # the check can fail: the plain softmax of the same logits does make subnormals
    with SubnormalOutputs() as plain:
        naive_attention(query, key, value, scaling)
    assert plain.count > 0
    subnormal = torch.tensor([TINY / 4])
    assert subnormal_count(subnormal * 1.0) == 1  # subnormals are on before the call (no flush-to-zero)
    with SubnormalOutputs() as mode:
        out, scores = attention_reference(query, key, value, scaling=scaling, key_scores=True, block_q=8)
    assert mode.count == 0
    assert subnormal_count(scores) == 0 and subnormal_count(out) == 0
    assert subnormal_count(subnormal * 1.0) == 1  # ... and after it: no global mode was changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_with_extreme_logits_equals_float64_softmax(dtype):
    """Logits in the thousands (a plain float32 softmax of them is one-hot up to subnormals and zeros): the base-2
    logits and exp2 of the torch path, and its additive causal bias on the chunk's keys, still give the float64
    softmax's output and key scores, and the same top keys per KV head (what the StateKV policy keeps)."""
    B, H, Hkv, q_len, kv_len, D = 1, 8, 4, 24, 90, 16
    query, key, value = peaked_qkv(B, H, Hkv, q_len, kv_len, D, spread=30.0, seed=3)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    scaling = D**-0.5
    want_out, want_scores = float64_attention(query, key, value, scaling)
    for block_q in (7, 128):
        with SubnormalOutputs() as mode:
            out, scores = attention(query, key, value, scaling=scaling, key_scores=True, block_q=block_q,
                                    backend="torch")
        assert mode.count == 0
        assert out.dtype == dtype and scores.dtype == torch.float32
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(scores.double(), want_scores, atol=tol * q_len, rtol=tol)
        top = want_scores.topk(16, dim=-1)
        assert torch.equal(scores.double().gather(-1, top.indices) > 0.5, top.values > 0.5)
