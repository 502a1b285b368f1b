"""nfkernels.sample_next: every backend against softmax(filter(logits)) and against each other.

Statistical checks use a fixed seed, so they are deterministic; a correct sampler passes the chi-square
test at p > 1e-4, a wrong filter or draw fails it by orders of magnitude (and sampling a removed token
fails outright).
"""
import pytest
import torch
from scipy.stats import chisquare

from nfkernels._ext import HAS_TRITON, has_op, triton_interpret
from nfkernels.sampling import draw_seed, filtered_logits, hash_uniform, sample_next, sample_next_reference

BACKENDS = ["reference", "torch"]
if has_op("sample_next"):
    BACKENDS.append("cpp")
if HAS_TRITON and (torch.cuda.is_available() or triton_interpret()):
    BACKENDS.append("triton")


def sample_on(logits, *args, backend, generator=None, seed=None, **kw):
    """sample_next on the backend's device: Triton runs on the GPU where there is one, else interpreted on CPU."""
    if backend != "triton" or not torch.cuda.is_available():
        return sample_next(logits, *args, generator=generator, seed=seed, backend=backend, **kw)
    dev = torch.device("cuda")
    if generator is not None:
        generator = torch.Generator(dev).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    kw = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in kw.items()}
    seed = None if seed is None else seed.to(dev)
    return sample_next(logits.to(dev), *args, generator=generator, seed=seed, backend=backend, **kw).cpu()


def draw(backend, logits, generator, **kw):
    if backend == "reference":
        return sample_next_reference(logits, generator=generator, **kw)
    return sample_on(logits, generator=generator, backend=backend, **kw)


def filtered_by_loop(row, temperature, top_k, top_p):
    """Per-row, sort-based statement of the filter, independent of filtered_logits' tensor code."""
    vals = (row.double() / temperature).tolist()
    order = sorted(range(len(vals)), key=lambda i: -vals[i])
    keep = set(range(len(vals)))
    if 0 < top_k < len(vals):
        kth = vals[order[top_k - 1]]
        keep = {i for i in keep if vals[i] >= kth}
    if top_p < 1:
        z = sum(torch.tensor([vals[i] for i in keep]).exp().tolist())
        cum, thr = 0.0, None
        for i in order:
            if i in keep:
                cum += torch.tensor(vals[i]).exp().item() / z
                if cum >= top_p:
                    thr = vals[i]
                    break
        keep = {i for i in keep if thr is None or vals[i] >= thr}
    return keep


CASES = {  # name: (temperature, top_k, top_p, cfg_scale)
    "plain": (0.8, 0, 1.0, 1.0),
    "top_k": (1.3, 4, 1.0, 1.0),
    "top_p": (1.0, 0, 0.6, 1.0),
    "top_k_top_p": (0.7, 6, 0.85, 1.0),
    "cfg": (1.0, 0, 1.0, 2.5),
    "cfg_top_k": (0.9, 5, 1.0, 3.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_distribution_matches_softmax_of_filtered_logits(backend, case):
    temperature, top_k, top_p, cfg = CASES[case]
    g = torch.Generator().manual_seed(1234)
    V, n = 13, 4000
    cond = torch.randn(1, V, generator=g) * 0.7
    uncond = torch.randn(1, V, generator=g) if cfg != 1.0 else None
    probs = torch.softmax(filtered_logits(cond, temperature, top_k, top_p, uncond, cfg), dim=1)[0].double()
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if uncond is not None:
        kw.update(uncond_logits=uncond.expand(n, V), cfg_scale=cfg)
    tokens = draw(backend, cond.expand(n, V), g, **kw)
    assert tokens.dtype == torch.int64 and tokens.shape == (n,)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0, "sampled a token the filter removes"
    kept = probs > 0
    assert kept.sum() >= 2  # the cases are chosen so the test has something to test
    expected = probs[kept] / probs[kept].sum() * n
    stat = chisquare(counts[kept].numpy(), expected.numpy())
    assert stat.pvalue > 1e-4, f"{backend}/{case}: chi-square p = {stat.pvalue:.2e}"


@pytest.mark.parametrize("shape", [(1, 1), (7, 37), (29, 301), (3, 4100)])
def test_filtered_logits_match_per_row_loop(shape):
    g = torch.Generator().manual_seed(shape[1])
    logits = torch.randn(*shape, generator=g) * 2
    for temperature, top_k, top_p in [(1.0, 3, 1.0), (0.7, 0, 0.5), (1.4, 11, 0.9), (1.0, 1, 0.3)]:
        got = filtered_logits(logits, temperature, top_k, top_p) > float("-inf")
        for r in range(min(shape[0], 3)):
            want = filtered_by_loop(logits[r], temperature, top_k, top_p)
            assert set(torch.nonzero(got[r]).flatten().tolist()) == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 1), (37, 301), (8, 4100)])
def test_top_k_1_is_argmax(backend, shape):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(*shape, generator=g)
    uncond = torch.randn(*shape, generator=g)
    assert torch.equal(draw(backend, logits, g, top_k=1), logits.argmax(1))
    mixed = uncond + 2.0 * (logits - uncond)
    assert torch.equal(draw(backend, logits, g, top_k=1, uncond_logits=uncond, cfg_scale=2.0), mixed.argmax(1))
    assert torch.equal(draw(backend, logits, g, top_p=1e-6), logits.argmax(1))  # top-p that keeps one token


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_stay_inside_each_rows_kept_set(backend):
    """Many different rows at once (odd B and V): every token lies in its own row's top-k / top-p set."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(203, 257, generator=g) * 3
    for top_k, top_p in [(9, 1.0), (0, 0.4), (17, 0.7)]:
        keep = filtered_logits(logits, 0.9, top_k, top_p) > float("-inf")
        tokens = draw(backend, logits, g, temperature=0.9, top_k=top_k, top_p=top_p)
        assert keep.gather(1, tokens[:, None]).all()
        assert tokens.unique().numel() > 50  # not stuck on one token


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fixed_seed_reproduces(backend):
    logits = torch.randn(33, 129, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return sample_on(logits, 1.0, 20, 0.9, generator=torch.Generator().manual_seed(seed), backend=backend)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    seed = torch.tensor([123456789], dtype=torch.int64)
    a = sample_on(logits, seed=seed, backend=backend)
    assert torch.equal(a, sample_on(logits, seed=seed, backend=backend))


# The interpreter evaluates both sides of the CFG tl.where: -inf - -inf in padding lanes, never selected
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_sample_as_their_float32_values(backend, dtype):
    # the CUDA decoder hands the op bf16 logits (and bf16 unconditional ones under CFG): same values, same tokens
    g = torch.Generator().manual_seed(3)
    logits, uncond = (torch.randn(17, 301, generator=g) * 3).to(dtype), torch.randn(17, 301, generator=g).to(dtype)
    for kw in [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.9, uncond_logits=uncond, cfg_scale=2.0)]:
        seed = torch.tensor([987654321], dtype=torch.int64)
        wide = {k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()}
        half = sample_on(logits, seed=seed, backend=backend, **kw)
        assert half.dtype == torch.int64
        assert torch.equal(half, sample_on(logits.float(), seed=seed, backend=backend, **wide))


@pytest.mark.skipif(not has_op("sample_next"), reason="nfkernels._C not built")
@pytest.mark.parametrize("shape", [(1, 2), (45, 259), (6, 4099)])
def test_cpp_equals_torch_for_the_same_seed(shape):
    """Same RNG (splitmix64 counters) and same filter: identical tokens, including with CFG."""
    g = torch.Generator().manual_seed(shape[1])
    logits, uncond = torch.randn(*shape, generator=g) * 2, torch.randn(*shape, generator=g)
    for kw in [dict(), dict(temperature=0.6, top_k=7), dict(top_p=0.8), dict(uncond_logits=uncond, cfg_scale=1.7,
                                                                         top_k=30, top_p=0.95)]:
        seed = draw_seed(g, torch.device("cpu"))
        assert torch.equal(sample_next(logits, seed=seed, backend="cpp", **kw),
                           sample_next(logits, seed=seed, backend="torch", **kw))


def test_mnist_logits_with_ties(data_root):
    """Real data: MNIST pixels as logits (many exact ties at 0 and at 1) — ties at a threshold are all kept."""
    from nfgen.data import load_split

    images = load_split("mnist:test[:64]", data_root=data_root).images
    logits = images.reshape(64, -1) * 6.0
    g = torch.Generator().manual_seed(0)
    for backend in [b for b in BACKENDS if b != "reference"]:
        for kw in [dict(top_k=5), dict(top_p=0.5), dict(top_k=40, top_p=0.9, temperature=0.5)]:
            keep = filtered_logits(logits, **kw) > float("-inf")
            tokens = draw(backend, logits, g, **kw)
            assert keep.gather(1, tokens[:, None]).all(), (backend, kw)
    if has_op("sample_next"):
        seed = draw_seed(g, torch.device("cpu"))
        assert torch.equal(sample_next(logits, top_k=5, top_p=0.7, seed=seed, backend="cpp"),
                           sample_next(logits, top_k=5, top_p=0.7, seed=seed, backend="torch"))


def test_hash_uniform_is_uniform_and_open():
    u = hash_uniform(torch.tensor([42]), (100, 1000))
    assert u.dtype == torch.float64 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002  # 5-6 sigma bounds


@pytest.mark.parametrize("fn", [sample_next, sample_next_reference])
def test_invalid_options_are_rejected(fn):
    logits = torch.randn(4, 10)
    bad = [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
           dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5), dict(uncond_logits=torch.randn(4, 11), cfg_scale=2.0),
           dict(cfg_scale=float("inf"))]
    for kw in bad:
        with pytest.raises(ValueError):
            fn(logits, **kw)
    with pytest.raises(ValueError):
        fn(torch.randn(10), top_k=1)
    with pytest.raises(ValueError):
        fn(torch.randint(0, 5, (4, 10)))
    if fn is sample_next:
        with pytest.raises(ValueError):
            fn(logits, backend="nope")
        with pytest.raises(ValueError):
            fn(logits, seed=torch.tensor([1.0]))
