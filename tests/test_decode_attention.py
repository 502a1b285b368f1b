"""nfkernels.decode_attention: the split-K Triton kernel and the C++ CPU op against the reference (slots past
kv_len never read), the dispatch's errors, and generation through either kernel (attention="triton" / "cpp")
against the SDPA path.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py), which costs
~20 ms per program, so shapes stay small. Tolerances: float32 1e-5 (absolute and relative; the kernel's
online softmax in exp2 differs from the reference by ~4e-7 at these sizes), fp16 / bf16 outputs within a few
units of their last place of the float32 reference on the same 16-bit inputs.
"""
import pytest
import torch

from nfgen.generate import Decoder, SampleConfig, decode_attention_impl, generate_tokens
from nfgen.io import NfgenError
from nfkernels import decode_attention, decode_attention_reference
from nfkernels._ext import HAS_TRITON, has_op, triton_interpret
from test_generate import VOCAB, small_model

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and (ON_CUDA or triton_interpret())),
                                  reason="needs Triton on CUDA, or TRITON_INTERPRET=1 on CPU")
HAS_CPP = has_op("decode_attention")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="needs nfkernels._C (the C++ build)")
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(B, H, H_kv, d, S_max, kv_len, dtype=torch.float32, seed=0):
    """q [B, H, 1, d] and caches [B, H_kv, S_max, d] whose slots >= kv_len hold NaN: read one and the output is NaN."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, d, generator=g) for h, t in ((H, 1), (H_kv, S_max), (H_kv, S_max)))
    k[:, :, kv_len:], v[:, :, kv_len:] = NAN, NAN
    kv = torch.tensor([kv_len], dtype=torch.int64)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), kv.to(DEVICE)


def triton_op(*args, **kw):
    from nfkernels.decode_attention_triton import decode_attention_triton

    return decode_attention_triton(*args, **kw)


def assert_matches_reference(got, q, k, v, kv):
    n = int(kv.item())
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all(), f"kv_len={n}: a slot >= kv_len was read"
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, kv), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"kv_len={n}: {m}")


# B, H, H_kv, d, S_max, block_n, chunk, use_dot: S_max is never a multiple of the chunk
CASES = [
    (3, 1, 1, 48, 37, 16, 16, True),  # G = 1 through tensor-core dots (rows padded to 16); 3 chunks, last partial
    (3, 4, 2, 16, 37, 16, 32, False),  # G = 2 on CUDA cores; chunks of 2 tiles
    (1, 4, 1, 64, 45, 16, 16, True),  # G = 4
    (1, 8, 1, 48, 37, 16, 16, False),  # G = 8 on CUDA cores
]


@needs_triton
@pytest.mark.parametrize("B,H,H_kv,d,S_max,block_n,chunk,use_dot", CASES)
def test_kernel_matches_reference_and_skips_unfilled_slots(B, H, H_kv, d, S_max, block_n, chunk, use_dot):
    for kv_len in (1, chunk, chunk + 1, S_max):  # one slot; a chunk boundary on each side; the whole cache
        q, k, v, kv = inputs(B, H, H_kv, d, S_max, kv_len, seed=kv_len)
        assert_matches_reference(triton_op(q, k, v, kv, block_n=block_n, chunk=chunk, use_dot=use_dot), q, k, v, kv)


@needs_triton
def test_dispatch_default_tiles_strided_q_and_device_kv_len():
    """The public op with its default tiles, on a q that is a strided view (as the model's is); the same
    kv_len tensor changed in place between calls (what a replayed CUDA graph sees); kv_len > S_max clamps."""
    B, H, H_kv, d, S_max = 3, 8, 2, 48, 70
    _, k, v, kv = inputs(B, H, H_kv, d, S_max, S_max)
    q = torch.randn(B, 1, H, d + 8, device=DEVICE)[..., :d].transpose(1, 2)  # [B, H, 1, d], not contiguous
    for n in (70, 33, 64):
        kv.fill_(n)
        want = decode_attention_reference(q, k, v, kv)
        torch.testing.assert_close(decode_attention(q, k, v, kv, backend="triton"), want, atol=1e-5, rtol=1e-5)
    kv.fill_(S_max + 9)
    torch.testing.assert_close(decode_attention(q, k, v, kv, backend="triton"),
                               decode_attention_reference(q, k, v, kv.clamp(max=S_max)), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,use_dot,atol", [(torch.float16, True, 2e-3), (torch.bfloat16, False, 2e-2)]
                         + ([(torch.bfloat16, True, 2e-2)] if ON_CUDA else []))  # interpreter: bf16 dots are wrong
def test_16_bit_caches(dtype, use_dot, atol):
    q, k, v, kv = inputs(3, 4, 2, 48, 37, 30, dtype=dtype)
    got = triton_op(q, k, v, kv, block_n=16, chunk=16, use_dot=use_dot)
    want = decode_attention_reference(q.float(), k.float(), v.float(), kv)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


# B, H, H_kv, d, S_max for the C++ op: d = 16/32/48/64 take the kernels specialised on d, 7 / 20 / 24 the
# generic loop; G = H / H_kv from 1 to 8; S_max odd, so at kv_len = S_max the 8-wide softmax blocks leave a tail
CPP_CASES = [(3, 3, 3, 16, 37), (2, 6, 2, 32, 45), (1, 8, 1, 48, 29), (2, 4, 2, 64, 19), (2, 3, 1, 7, 13),
             (1, 6, 3, 20, 11), (2, 8, 4, 24, 9)]


@needs_cpp
@pytest.mark.parametrize("isa", ["native", "baseline"])
@pytest.mark.parametrize("B,H,H_kv,d,S_max", CPP_CASES)
def test_cpp_matches_reference_and_skips_unfilled_slots(B, H, H_kv, d, S_max, isa, monkeypatch):
    """The C++ op against the reference at kv_len 1, 7, 8, 9 (either side of one 8-wide softmax block) and
    S_max, in its AVX2 copy and its baseline copy (NFKERNELS_NO_AVX2, read on every call). Slots past kv_len
    hold NaN: reading one would poison the output. At odd kv_len the scores spread over hundreds, so the
    vectorised exp also runs where it flushes to 0 (below -87); at even kv_len they stay within ~±1."""
    if isa == "baseline":
        monkeypatch.setenv("NFKERNELS_NO_AVX2", "1")
    for kv_len in sorted({1, 7, 8, 9, S_max} & set(range(1, S_max + 1))):
        q, k, v, kv = (t.cpu() for t in inputs(B, H, H_kv, d, S_max, kv_len, seed=kv_len))
        q = q * (40 if kv_len % 2 else 0.1)
        assert_matches_reference(decode_attention(q, k, v, kv, backend="cpp"), q, k, v, kv)


@needs_cpp
def test_cpp_strided_inputs_and_auto_dispatch():
    """A strided q (as the model's is) and a cache that is a view; auto takes the C++ op for float32 CPU
    tensors (close to the reference, not bit-equal: another summation order) and the reference otherwise."""
    B, H, H_kv, d, S_max = 3, 8, 2, 48, 70
    _, k, v, kv = (t.cpu() for t in inputs(B, H, H_kv, d, S_max, 40))
    q = torch.randn(B, 1, H, d + 8)[..., :d].transpose(1, 2)  # [B, H, 1, d], not contiguous
    want = decode_attention_reference(q, k, v, kv)
    torch.testing.assert_close(decode_attention(q, k, v, kv), want, atol=1e-5, rtol=1e-5)
    k_view = torch.cat([k, k], dim=3)[..., :d]  # not contiguous
    torch.testing.assert_close(decode_attention(q, k_view, v, kv, backend="cpp"), want, atol=1e-5, rtol=1e-5)
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert torch.equal(decode_attention(q64, k64, v64, kv), decode_attention_reference(q64, k64, v64, kv))


def test_bad_inputs_are_one_line_value_errors():
    q, k, v, kv = (t.cpu() for t in inputs(2, 4, 2, 16, 9, 5))
    bad = {
        "q 3-d": (q[:, :, 0], k, v, kv),
        "two queries": (q.expand(2, 4, 2, 16), k, v, kv),
        "k, v shapes": (q, k, v[:, :, :8], kv),
        "batch": (q[:1], k, v, kv),
        "head dim": (q[..., :8], k, v, kv),
        "H not a multiple of H_kv": (q[:, :3], k, v, kv),
        "k, v dtypes": (q, k, v.double(), kv),
        "kv_len an int": (q, k, v, 5),
        "kv_len int32": (q, k, v, kv.int()),
        "kv_len two elements": (q, k, v, kv.repeat(2)),
        "integer q": (q.long(), k, v, kv),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError) as err:
            decode_attention(*args)
        assert "\n" not in str(err.value), what
    for dtype in (torch.bfloat16, torch.float64):  # the C++ op is float32 only
        with pytest.raises(ValueError, match="backend 'cpp' is not available"):
            decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), kv, backend="cpp")
    ops = [decode_attention_reference] + ([lambda *a: decode_attention(*a, backend="cpp")] if HAS_CPP else [])
    for op in ops:  # the reference and the C++ op check kv_len's value (on CPU reading it is free)
        for n in (0, 10):
            with pytest.raises(ValueError, match=r"kv_len must be in \[1, S_max = 9\]"):
                op(q, k, v, torch.tensor([n]))


# each decode-attention kernel on the device it runs on: Triton on CUDA (interpreted on CPU), C++ on CPU
KERNELS = [pytest.param("triton", DEVICE, marks=needs_triton),
           pytest.param("cpp", torch.device("cpu"), marks=needs_cpp)]


@pytest.mark.parametrize("attention,device", KERNELS)
def test_forward_cached_decode_step_matches_sdpa_and_full_forward(attention, device):
    """One decode step at position 6 after a 6-token prefill: the kernel attends to slots 0 … 6 (kv_len =
    input_pos + 1), the same logits as the masked SDPA step and as the uncached forward's last position
    (logits up to ~8 in magnitude; ~1e-6 apart seen, 1e-4 allowed; reading one slot too few moved them 0.17)."""
    model = small_model(8, n_kv_head=1).to(device)
    seq = torch.randint(0, VOCAB.n_codes, (3, 7), generator=torch.Generator().manual_seed(8)).to(device)
    with torch.no_grad():
        full = model(seq)[0][:, -1]
        steps = {}
        for how in ("sdpa", attention):
            model.setup_kv_cache(3, 12)
            model.forward_cached(seq[:, :6], torch.arange(6, device=device), attention=how)  # prefill: SDPA
            pos = torch.tensor([6], device=device)
            steps[how] = model.forward_cached(seq[:, 6:], pos, attention=how)[:, -1]
    torch.testing.assert_close(steps[attention], steps["sdpa"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(steps[attention], full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attention,device", KERNELS)
def test_kernel_decoder_greedy_equals_sdpa_and_reads_only_filled_slots(attention, device):
    """Greedy tokens through the kernel equal SDPA's. The Decoder with a decode-attention kernel always
    takes its one fixed-shape step, the step a CUDA graph would capture, so this is what the graph runs. Every
    cache slot starts as NaN: a slot read before its decode step wrote it would poison the logits."""
    from nfkernels.sampling import draw_seed

    length = 12
    model = small_model(6, n_kv_head=1).to(device)  # 2 query heads on 1 KV head; float32 on CUDA too
    classes = torch.tensor([0, 2, -1])
    cls = torch.where(classes < 0, VOCAB.no_class, VOCAB.n_codes + 2 + classes).to(device)
    seeds = draw_seed(None, device, length)
    with torch.no_grad():
        cfg = SampleConfig(top_k=1, attention="sdpa", cuda_graph=False, quiet=True)
        want = Decoder(model, VOCAB, 3, length, cfg, device).run(cls, seeds).clone()
        cfg = SampleConfig(top_k=1, attention=attention, cuda_graph=False, quiet=True)
        dec = Decoder(model, VOCAB, 3, length, cfg, device)
        assert dec.static_shapes and dec._buckets() == [length + 1]  # one graph for every step
        for block in model.transformer.h:
            block.attn.kv_cache.k.fill_(NAN), block.attn.kv_cache.v.fill_(NAN)
        got = dec.run(cls, seeds)
    assert torch.equal(got, want)
    assert len(set(map(tuple, want.tolist()))) > 1


@pytest.mark.parametrize("attention,device", KERNELS)
def test_generate_tokens_with_kernel_attention_and_guidance(attention, device):
    """SampleConfig(attention=kernel) through generate_tokens, with CFG (conditional and NO_CLASS rows in
    one batch) and one KV head per query head. On CUDA this is the captured graph, in bf16 on both sides:
    equal greedy tokens then rest on the wide logit margins of small_model (not checked on a GPU yet)."""
    model = small_model(7)
    classes = torch.tensor([1, -1])
    kw = {"top_k": 1, "cfg_scale": 2.5, "quiet": True}
    want = generate_tokens(model, VOCAB, classes, 5, SampleConfig(attention="sdpa", **kw), device)
    got = generate_tokens(model, VOCAB, classes, 5, SampleConfig(attention=attention, **kw), device)
    assert torch.equal(got, want)


def test_auto_attention_is_the_cpp_kernel_on_cpu_for_float32():
    assert decode_attention_impl("auto", torch.device("cpu"), torch.float32) == ("cpp" if HAS_CPP else "sdpa")
    assert decode_attention_impl("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert decode_attention_impl("auto", torch.device("cuda"), torch.float32) == "sdpa"
    assert decode_attention_impl("sdpa", torch.device("cpu"), torch.float32) == "sdpa"


def test_attention_option_errors(monkeypatch):
    model = small_model()
    with pytest.raises(NfgenError, match="--attention must be one of auto, sdpa, triton, cpp"):
        generate_tokens(model, VOCAB, torch.tensor([0]), 4, SampleConfig(attention="flash"))
    with pytest.raises(ValueError, match="attention must be one of"):
        model.setup_kv_cache(1, 4)
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), attention="flash")
    import nfkernels._ext as ext

    monkeypatch.setattr(ext, "triton_interpret", lambda: False)  # CPU without the interpreter: no Triton
    with pytest.raises(NfgenError, match="--attention triton: .*use --attention sdpa"):
        generate_tokens(model, VOCAB, torch.tensor([0]), 4, SampleConfig(attention="triton"), "cpu")
    with pytest.raises(NfgenError, match="--attention cpp: .*use --attention sdpa"):  # float32 only
        generate_tokens(model.to(torch.bfloat16), VOCAB, torch.tensor([0]), 4, SampleConfig(attention="cpp"), "cpu")


def test_cli_attention_flag():
    from nfgen.cli import _config, build_parser

    parser = build_parser()
    assert _config(SampleConfig, parser.parse_args(["generate"])).attention == "auto"
    assert _config(SampleConfig, parser.parse_args(["generate", "--attention", "triton"])).attention == "triton"
    # an unknown value is refused by SampleConfig in one line (test_cli: exit 2), not by argparse's usage dump
    with pytest.raises(NfgenError, match="--attention must be one of auto, sdpa, triton, cpp"):
        _config(SampleConfig, parser.parse_args(["generate", "--attention", "flash"])).validate()
