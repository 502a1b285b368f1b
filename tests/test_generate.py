"""nfgen.generate: cached decoding against full recomputation, seeds, CFG, batching, the stage end to end."""
import pytest
import torch

from nfgen.generate import SampleConfig, generate_tokens, generate_weights, run_generate
from nfgen.io import NfgenError
from nfgen.model import GPT, GPTConfig, save_model
from nfgen.vocab import Vocab
from nfkernels._ext import HAS_TRITON, has_op, triton_interpret

VOCAB = Vocab(n_codes=19, n_classes=3)
L = 21


def small_model(seed=0, vocab=VOCAB, length=L, n_kv_head=0, class_embed=False):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab.size, block_size=length + 1, n_layer=2, n_head=2, n_embd=16,
                    n_kv_head=n_kv_head, class_embed=class_embed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make the distribution far from uniform so greedy and sampling are sensitive
        model.lm_head.weight.mul_(40)
    return model


def greedy_by_recompute(model, vocab, classes, length, cfg_scale=1.0):
    """NeF-GPT's way: rerun the whole prefix every token; argmax over code tokens (CFG-mixed)."""
    cls = torch.where(classes < 0, vocab.no_class, vocab.n_codes + 2 + classes)
    seq = torch.stack([torch.full_like(cls, vocab.sos), cls], 1)
    unc = torch.stack([torch.full_like(cls, vocab.sos), torch.full_like(cls, vocab.no_class)], 1)
    with torch.no_grad():
        for _ in range(length):
            lc = model(seq)[0][:, -1, :vocab.n_codes]
            if cfg_scale != 1.0:
                lu = model(unc)[0][:, -1, :vocab.n_codes]
                lc = lu + cfg_scale * (lc - lu)
            nxt = lc.argmax(-1, keepdim=True)
            seq, unc = torch.cat([seq, nxt], 1), torch.cat([unc, nxt], 1)
    return seq[:, 2:]


BACKENDS = ["torch"] + (["cpp"] if has_op("sample_next") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_scale,n_kv_head,class_embed", [(1.0, 0, False), (2.5, 0, False), (2.5, 1, False),
                                                             (2.5, 1, True)])
def test_greedy_equals_full_recompute(backend, cfg_scale, n_kv_head, class_embed):
    model = small_model(n_kv_head=n_kv_head, class_embed=class_embed)
    classes = torch.tensor([0, 2, -1, 1, 1])
    want = greedy_by_recompute(model, VOCAB, classes, L, cfg_scale)
    cfg = SampleConfig(top_k=1, cfg_scale=cfg_scale, batch_size=2, backend=backend, quiet=True)
    got = generate_tokens(model, VOCAB, classes, L, cfg)
    assert got.dtype == torch.int64 and got.shape == (5, L)
    assert torch.equal(got, want)
    assert len(set(map(tuple, want.tolist()))) > 1  # the classes really condition the model


@pytest.mark.skipif(not (HAS_TRITON and triton_interpret()), reason="needs Triton (interpreter on CPU)")
def test_triton_backend_greedy_and_range():
    model = small_model(1)
    classes = torch.tensor([1, -1, 0])
    cfg = SampleConfig(top_k=1, backend="triton", quiet=True)
    assert torch.equal(generate_tokens(model, VOCAB, classes, 6, cfg), greedy_by_recompute(model, VOCAB, classes, 6))
    toks = generate_tokens(model, VOCAB, classes, 6, SampleConfig(backend="triton", quiet=True, top_p=0.9))
    assert toks.min() >= 0 and toks.max() < VOCAB.n_codes


@pytest.mark.parametrize("bucket,n_kv_head,class_embed", [(4, 0, False), (7, 0, False), (128, 0, False), (7, 1, False),
                                                         (7, 1, True)])
def test_static_shapes_path_equals_eager(monkeypatch, bucket, n_kv_head, class_embed):
    """What the CUDA graphs compute (attention over a whole, partly stale bucket of the cache, masked by
    position), run eagerly on CPU: same tokens as the prefix-only eager loop. Two batches share one
    decoder, so the second one starts on the first one's stale cache."""
    import nfgen.generate as G

    model = small_model(5, n_kv_head=n_kv_head, class_embed=class_embed)
    classes = torch.tensor([0, 1, 2, -1, 0, 2])
    cfg = SampleConfig(temperature=1.2, top_k=7, cfg_scale=1.5, seed=4, backend="torch", attention="sdpa", quiet=True)
    monkeypatch.setattr(G, "GRAPH_BUCKET", bucket)
    dec = G.Decoder(model, VOCAB, 3, L, cfg, torch.device("cpu"), static_shapes=True)
    assert dec._buckets()[-1] == L + 1 and len(dec._buckets()) == -(-(L + 1) // bucket)
    gen = torch.Generator().manual_seed(4)
    from nfkernels.sampling import draw_seed

    with torch.no_grad():
        seeds = draw_seed(gen, torch.device("cpu"), L)
        cls = torch.where(classes < 0, VOCAB.no_class, VOCAB.n_codes + 2 + classes)
        first = dec.run(cls[:3], seeds).clone()
        second = dec.run(cls[3:], seeds).clone()
        ref = G.Decoder(model, VOCAB, 3, L, cfg, torch.device("cpu"))
        assert torch.equal(first, ref.run(cls[:3], seeds))
        assert torch.equal(second, ref.run(cls[3:], seeds))
    assert not torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attention", ["sdpa"] + (["triton"] if HAS_TRITON else []))
def test_captured_decode_step_equals_the_same_step_run_eagerly_on_the_gpu(attention):
    """The quality runs' GPU path, which the CPU tests above cannot reach: a bf16 model, CFG, the class
    embedding, residual-level ranges and the expected code vectors, decoded by replaying CUDA graphs, draws the
    tokens (and records the means) that the same fixed-shape step draws when run without capture."""
    import copy

    import nfgen.generate as G
    from nfgen.common import make_generator
    from nfkernels.sampling import draw_seed

    dev = torch.device("cuda")
    model = copy.deepcopy(small_model(8, class_embed=True)).to(dev, torch.bfloat16)
    vectors = torch.randn(VOCAB.n_codes, 2, generator=torch.Generator().manual_seed(1))
    ranges = torch.tensor([[0, 10], [10, 19]]).repeat(L // 2 + 1, 1)[:L]
    cls = torch.tensor([VOCAB.n_codes + 2, VOCAB.no_class, VOCAB.n_codes + 4], device=dev)
    seeds = draw_seed(make_generator(3, dev), dev, L)
    out = {}
    for graph in (True, False):
        cfg = SampleConfig(temperature=1.1, top_k=7, top_p=0.95, cfg_scale=1.5, attention=attention,
                           cuda_graph=graph, quiet=True)
        dec = G.Decoder(model, VOCAB, 3, L, cfg, dev, ranges, static_shapes=True, code_vectors=vectors)
        assert bool(dec.graphs) == graph
        with torch.no_grad():
            out[graph] = dec.run(cls, seeds).clone(), dec.values.clone()
    assert torch.equal(out[True][0], out[False][0])
    assert ((out[True][0] >= ranges[:, 0].to(dev)) & (out[True][0] < ranges[:, 1].to(dev))).all()
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-3, atol=1e-4)


def test_fixed_seed_reproduces_and_backends_share_rng():
    model = small_model(2)
    classes = torch.tensor([0, 1, 2, -1, 0, 1, 2])
    cfg = SampleConfig(temperature=1.5, seed=11, batch_size=4, quiet=True, backend="torch")
    a = generate_tokens(model, VOCAB, classes, L, cfg)
    assert torch.equal(a, generate_tokens(model, VOCAB, classes, L, cfg))
    assert not torch.equal(a, generate_tokens(model, VOCAB, classes, L, SampleConfig(**{**cfg.__dict__, "seed": 12})))
    assert a.min() >= 0 and a.max() < VOCAB.n_codes  # specials (SOS, classes) are never sampled
    if has_op("sample_next"):
        cpp = SampleConfig(**{**cfg.__dict__, "backend": "cpp"})
        assert torch.equal(a, generate_tokens(model, VOCAB, classes, L, cpp))


def test_token_ranges_restrict_each_position():
    model = small_model(3)
    ranges = torch.tensor([[0, 10], [10, 19]]).repeat(L // 2 + 1, 1)[:L]  # two residual levels
    toks = generate_tokens(model, VOCAB, torch.tensor([0, 1, -1, 2]), L,
                           SampleConfig(temperature=2.0, quiet=True), token_ranges=ranges)
    assert ((toks >= ranges[:, 0]) & (toks < ranges[:, 1])).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expected_values_are_the_draw_distributions_means(backend):
    """With code vectors the decoder draws the same tokens, and records at each position the mean code vector
    under softmax(filtered logits) of a full recompute over the drawn prefix (CFG-mixed with the NO_CLASS run)."""
    from nfkernels.sampling import filtered_logits

    model = small_model(6)
    classes = torch.tensor([0, 2, -1, 1, 1])
    vectors = torch.randn(VOCAB.n_codes, 2, generator=torch.Generator().manual_seed(1))
    opts = dict(temperature=1.3, top_k=7, top_p=0.95, cfg_scale=1.5)
    cfg = SampleConfig(**opts, seed=5, batch_size=2, backend=backend, quiet=True)
    tokens, values = generate_tokens(model, VOCAB, classes, L, cfg, code_vectors=vectors)
    assert torch.equal(tokens, generate_tokens(model, VOCAB, classes, L, cfg))
    cls = torch.where(classes < 0, VOCAB.no_class, VOCAB.n_codes + 2 + classes)
    sos = torch.full_like(cls, VOCAB.sos)
    seq = torch.cat([torch.stack([sos, cls], 1), tokens], 1)
    unc = torch.cat([torch.stack([sos, torch.full_like(cls, VOCAB.no_class)], 1), tokens], 1)
    with torch.no_grad():
        lc = model(seq[:, :-1])[0][:, 1:, :VOCAB.n_codes]  # logits for positions 0 … L-1 given the drawn prefix
        lu = model(unc[:, :-1])[0][:, 1:, :VOCAB.n_codes]
    probs = torch.softmax(filtered_logits(lc.reshape(-1, VOCAB.n_codes), uncond_logits=lu.reshape(-1, VOCAB.n_codes),
                                          **opts), dim=1)
    torch.testing.assert_close(values, (probs @ vectors).view(len(classes), L, 2), rtol=1e-4, atol=1e-5)
    drawn = vectors[tokens]
    assert (values - drawn).abs().max() > 0.05  # the means are not the drawn codes' vectors


def test_generate_weights_expected_is_sampled_under_top_k_1_and_differs_otherwise(tmp_path):
    tok = _tokens_file(tmp_path / "tokens.safetensors")  # two residual levels
    vocab = Vocab(tok.n_codes, 3)
    model = small_model(4, vocab, tok.tokens_per_field)
    classes = torch.tensor([0, 1, 2, -1])

    def both(**kw):
        return [generate_weights(model, vocab, classes, tok, SampleConfig(**kw, weights=w, seed=2, quiet=True))
                for w in ("sampled", "expected")]

    (t_s, w_s), (t_e, w_e) = both(top_k=1)
    assert torch.equal(t_s, t_e) and torch.equal(w_s, tok.decode(t_s))
    torch.testing.assert_close(w_e, w_s, rtol=0, atol=1e-6)  # a one-code distribution's mean is that code
    (t_s, w_s), (t_e, w_e) = both(temperature=3.0)
    assert torch.equal(t_s, t_e) and w_e.shape == w_s.shape == (4, 17)
    assert (w_e - w_s).abs().max() > 1e-3
    # each expected weight lies within its levels' code ranges summed: a mean of codes, not an extrapolation
    cb = tok.codebooks[:, :, 0]
    assert (w_e >= cb.min(dim=1).values.sum() - 1e-6).all() and (w_e <= cb.max(dim=1).values.sum() + 1e-6).all()
    with pytest.raises(NfgenError, match="code vectors"):
        tok.decode_vectors(torch.zeros(1, tok.tokens_per_field - 1, 1))


def test_expected_from_keeps_the_draws_before_it_and_the_means_after(tmp_path):
    """expected_from K: positions < K keep their drawn codes, positions ≥ K their expected ones (same draws)."""
    tok = _tokens_file(tmp_path / "tokens.safetensors")  # two residual levels: weight j is positions 2j and 2j+1
    vocab = Vocab(tok.n_codes, 3)
    model = small_model(4, vocab, tok.tokens_per_field)
    classes = torch.tensor([0, 1, 2, -1, 1])

    def run(**kw):
        return generate_weights(model, vocab, classes, tok, SampleConfig(temperature=3.0, seed=5, quiet=True, **kw))

    t_s, w_s = run()
    t_e, w_e = run(weights="expected")
    for k in (1, 4, 9):
        t_k, w_k = run(weights="expected", expected_from=k)
        assert torch.equal(t_k, t_s) and torch.equal(t_e, t_s)
        whole = k // 2  # weights whose two positions are both before k: the draws; both at or after k: the means
        torch.testing.assert_close(w_k[:, :whole], w_s[:, :whole], rtol=0, atol=1e-6)
        torch.testing.assert_close(w_k[:, -(-k // 2):], w_e[:, -(-k // 2):], rtol=0, atol=1e-6)
        assert (w_k[:, -(-k // 2):] - w_s[:, -(-k // 2):]).abs().max() > 1e-3  # and the means are not the draws
        if k % 2:  # weight k // 2 adds its drawn first level to its expected second level: neither of the two
            mixed = w_k[:, k // 2]
            assert not torch.allclose(mixed, w_s[:, k // 2]) and not torch.allclose(mixed, w_e[:, k // 2])
    with pytest.raises(NfgenError, match="past the 34 code tokens"):
        run(weights="expected", expected_from=tok.tokens_per_field)



def test_coarse_tokens_are_drawn_in_range_and_not_counted_by_expected_from():
    """--coarse: each bin is drawn among the bins, and expected_from K counts code tokens, so components < K keep
    their drawn codes and components ≥ K take their expected ones, whatever bins sit between them."""
    from nfgen.tokenizer import TokenizerConfig, WeightTokenizer
    from nfkernels.siren import SirenSpec

    spec = SirenSpec(in_dim=2, hidden=4, hidden_layers=1, out_dim=1, omega0=30.0)  # P = 17
    w = torch.randn(40, spec.num_params, generator=torch.Generator().manual_seed(1))
    tok = WeightTokenizer.fit(w, spec, TokenizerConfig(codebook_size=8, iters=3, basis="pca", coarse=3,
                                                       coarse_levels=3, quiet=True))
    vocab = Vocab(tok.n_codes, 3)
    model = small_model(4, vocab, tok.tokens_per_field)
    classes = torch.tensor([0, 1, 2, -1, 1])

    def run(**kw):
        tokens, weights = generate_weights(model, vocab, classes, tok, SampleConfig(temperature=3.0, seed=5,
                                                                                    quiet=True, **kw))
        return tokens, tok._vectors(weights).reshape(len(classes), -1)  # back to the 17 standardised components

    t_s, c_s = run()
    assert tok.tokens_per_field == 20 and (t_s[:, [0, 2, 4]] < 3).all()  # bins among the 3 bins
    t_e, c_e = run(weights="expected")
    for k in (1, 3, 5):
        t_k, c_k = run(weights="expected", expected_from=k)
        assert torch.equal(t_k, t_s) and torch.equal(t_e, t_s)
        torch.testing.assert_close(c_k[:, :k], c_s[:, :k], rtol=0, atol=1e-4)
        torch.testing.assert_close(c_k[:, k:], c_e[:, k:], rtol=0, atol=1e-4)
    with pytest.raises(NfgenError, match="past the 17 code tokens"):
        run(weights="expected", expected_from=17)

def test_bad_options_and_mismatches():
    model = small_model()
    for bad in [dict(temperature=0.0), dict(top_k=-1), dict(top_p=1.5), dict(batch_size=0), dict(backend="gpu"),
                dict(weights="mean"), dict(weights="expected", expected_from=-1), dict(expected_from=3)]:
        with pytest.raises(NfgenError):
            generate_tokens(model, VOCAB, torch.tensor([0]), L, SampleConfig(**bad))
    with pytest.raises(NfgenError, match="vocabulary"):
        generate_tokens(model, Vocab(20, 3), torch.tensor([0]), L, SampleConfig())
    with pytest.raises(NfgenError, match="block size"):
        generate_tokens(model, VOCAB, torch.tensor([0]), L + 1, SampleConfig())
    with pytest.raises(NfgenError, match="class"):
        generate_tokens(model, VOCAB, torch.tensor([3]), L, SampleConfig())


def _tokens_file(path, levels=2):
    from nfgen.tokenizer import TokenizerConfig, TokenSet, WeightTokenizer, save_tokens
    from nfkernels.siren import SirenSpec

    spec = SirenSpec(in_dim=2, hidden=4, hidden_layers=1, out_dim=1, omega0=30.0)  # P = 17
    tcfg = TokenizerConfig(codebook_size=8, levels=levels)
    g = torch.Generator().manual_seed(0)
    tok = WeightTokenizer(spec, tcfg, torch.randn(levels, 8, 1, generator=g) * 0.1, torch.ones(4))
    tokens = torch.randint(0, 8, (6, tok.tokens_per_field), generator=g) + tok.token_ranges()[:, 0]
    ts = TokenSet(tokens=tokens, labels=torch.tensor([0, 1, 2, 0, 1, 2]), tokenizer=tok, spec=spec,
                  image_shape=(8, 8), meta={"n_classes": 3})
    save_tokens(path, ts)
    return tok


def test_run_generate_writes_fields_and_png(tmp_path):
    from nfgen.fields import load_fields

    tok = _tokens_file(tmp_path / "tokens.safetensors")
    vocab = Vocab(tok.n_codes, 3)
    model = small_model(4, vocab, tok.tokens_per_field)
    save_model(tmp_path / "model.safetensors", model,
               {"n_codes": tok.n_codes, "n_classes": 3, "tokens_per_field": tok.tokens_per_field})
    cfg = SampleConfig(top_k=5, cfg_scale=1.5, seed=3, quiet=True)
    summary = run_generate(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", tmp_path / "out",
                           per_class=2, unconditional=3, cfg=cfg, device="cpu")
    fields = load_fields(summary["samples"])
    assert fields.weights.shape == (9, 17) and torch.isfinite(fields.weights).all()
    assert fields.labels.tolist() == [0, 0, 1, 1, 2, 2, -1, -1, -1]
    assert fields.meta["generated"] is True and (fields.psnr == 0).all()
    from PIL import Image

    with Image.open(tmp_path / "out" / "samples.png") as png:  # 3 class rows + 1 unconditional row of 8x8 images
        assert png.height == (4 * (8 + 2) + 2) * 2
    again = run_generate(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", tmp_path / "again",
                         per_class=2, unconditional=3, cfg=cfg, device="cpu")
    assert torch.equal(load_fields(again["samples"]).weights, fields.weights)  # same seed, same fields



def test_load_generator_samples_what_run_generate_writes(tmp_path):
    from nfgen.fields import load_fields
    from nfgen.generate import load_generator

    tok = _tokens_file(tmp_path / "tokens.safetensors")
    vocab = Vocab(tok.n_codes, 3)
    save_model(tmp_path / "model.safetensors", small_model(4, vocab, tok.tokens_per_field),
               {"n_codes": tok.n_codes, "n_classes": 3, "tokens_per_field": tok.tokens_per_field})
    gen = load_generator(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", device="cpu")
    assert gen.n_classes == 3 and gen.spec.num_params == 17 and gen.image_shape == (8, 8)
    cfg = SampleConfig(top_k=5, seed=3, quiet=True)
    tokens, weights = gen.sample([0, 0, 1, 1, 2, 2, -1], cfg)
    assert tokens.shape == (7, tok.tokens_per_field) and weights.shape == (7, 17)
    summary = run_generate(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", tmp_path / "out",
                           per_class=2, unconditional=1, cfg=cfg, device="cpu")
    assert torch.equal(load_fields(summary["samples"]).weights, weights)  # the same draws, written

def test_run_generate_rejects_mismatched_artifacts(tmp_path):
    tok = _tokens_file(tmp_path / "tokens.safetensors")
    model = small_model(0, Vocab(tok.n_codes + 4, 3), tok.tokens_per_field)
    save_model(tmp_path / "model.safetensors", model,
               {"n_codes": tok.n_codes + 4, "n_classes": 3, "tokens_per_field": tok.tokens_per_field})
    with pytest.raises(NfgenError, match="trained on"):
        run_generate(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", tmp_path / "out",
                     per_class=1, cfg=SampleConfig(quiet=True), device="cpu")
    assert not (tmp_path / "out" / "samples.safetensors").exists()
    with pytest.raises(NfgenError, match="not found"):
        run_generate(tmp_path / "nope.safetensors", tmp_path / "tokens.safetensors", tmp_path / "out", per_class=1)
    with pytest.raises(NfgenError, match="nothing to generate"):
        run_generate(tmp_path / "model.safetensors", tmp_path / "tokens.safetensors", tmp_path / "out", per_class=0)
