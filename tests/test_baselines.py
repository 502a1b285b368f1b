"""nfgen.baselines: the reference generators without a GPT (per-class Gaussian, per-position token frequencies,
smoothed bootstrap)."""
import pytest
import torch

from nfgen.baselines import (bootstrap_token_weights, gaussian_samples, marginal_token_samples, marginal_token_weights,
                             modes_as_classes, smoothed_bootstrap, token_marginals)
from nfgen.common import make_generator
from nfgen.generate import CLASS_DRAW_SEED_OFFSET
from nfgen.io import NfgenError
from nfgen.tokenizer import TokenizerConfig, WeightTokenizer
from nfkernels import SirenSpec, siren_init


def _data(n_per_class=(7, 30), d=5, seed=0):
    g = make_generator(seed)
    xs, labels = [], []
    for c, n in enumerate(n_per_class):
        xs.append(torch.randn(n, d, generator=g, dtype=torch.float64) * (c + 1) + 10 * c)
        labels.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(labels)


def test_draws_lie_in_the_affine_span_of_their_class():
    # class 0 has 3 rows in 5 dims: their centred span is a plane, and every draw of class 0 must lie in it
    x, labels = _data(n_per_class=(3, 30))
    classes = torch.tensor([0] * 50 + [1] * 4)
    draws = gaussian_samples(x, labels, classes, make_generator(1))
    assert draws.shape == (54, 5) and draws.dtype == torch.float64
    rows = x[labels == 0]
    basis = (rows - rows.mean(0)).T  # [5, 3], rank 2
    coef = torch.linalg.lstsq(basis, (draws[:50] - rows.mean(0)).T).solution
    assert torch.allclose(basis @ coef, (draws[:50] - rows.mean(0)).T, atol=1e-10)
    assert (draws[50:, 0] > 5).all()  # class 1 lives around 10, class 0 around 0


def test_moments_match_the_class_statistics():
    x, labels = _data()
    classes = torch.cat([torch.zeros(40000, dtype=torch.long), torch.full((40000,), -1)])
    draws = gaussian_samples(x, labels, classes, make_generator(2))
    for c, sel, got in ((0, labels == 0, draws[:40000]), (-1, torch.ones_like(labels, dtype=torch.bool), draws[40000:])):
        rows = x[sel]
        scale = rows.std(0).max()
        assert torch.allclose(got.mean(0), rows.mean(0), atol=0.03 * scale), c
        assert torch.allclose(torch.cov(got.T), torch.cov(rows.T), atol=0.05 * scale ** 2), c


def test_seeded_order_independent_and_dtype_kept():
    x, labels = _data()
    x32 = x.float()
    classes = torch.tensor([1, 0, 1, -1, 0])
    a = gaussian_samples(x32, labels, classes, make_generator(3))
    b = gaussian_samples(x32, labels, classes, make_generator(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    # per class, the draws are one block in ascending class order: where the entries sit does not matter
    perm = torch.tensor([1, 4, 0, 2, 3])
    c = gaussian_samples(x32, labels, classes[perm], make_generator(3))
    for cls in (-1, 0, 1):
        assert torch.equal(a[classes == cls], c[classes[perm] == cls])
    assert not torch.equal(a, gaussian_samples(x32, labels, classes, make_generator(4)))


def test_bad_input_is_a_clear_error():
    x, labels = _data(n_per_class=(1, 5))
    with pytest.raises(NfgenError, match="class 0 has 1 example"):
        gaussian_samples(x, labels, torch.tensor([0, 1]), make_generator(0))
    with pytest.raises(NfgenError, match="class 7 has 0 example"):
        gaussian_samples(x, labels, torch.tensor([7]), make_generator(0))
    with pytest.raises(NfgenError, match="x \\[N, D\\] and labels \\[N\\]"):
        gaussian_samples(x, labels[:-1], torch.tensor([1]), make_generator(0))


def _token_data():
    # class 0: position 0 always code 3, position 1 codes 1 / 2 at 1:3; class 1: position 0 code 0, position 1 code 5
    t0 = torch.tensor([[3, 1]] * 10 + [[3, 2]] * 30)
    t1 = torch.tensor([[0, 5]] * 20)
    return torch.cat([t0, t1]), torch.tensor([0] * 40 + [1] * 20)


def test_token_marginals_are_per_class_position_frequencies():
    tokens, labels = _token_data()
    f = token_marginals(tokens.to(torch.int16), labels, n_codes=6)
    assert f.shape == (3, 2, 6) and f.dtype == torch.float64
    assert torch.allclose(f.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert f[0, 0, 3] == 1 and f[0, 1, 1] == 0.25 and f[0, 1, 2] == 0.75
    assert f[1, 0, 0] == 1 and f[1, 1, 5] == 1
    # the last entry pools every sequence: position 0 is code 3 in 40 of 60
    assert f[2, 0, 3] == pytest.approx(40 / 60) and f[2, 0, 0] == pytest.approx(20 / 60)


def test_marginal_draws_follow_the_frequencies_independently():
    tokens, labels = _token_data()
    f = token_marginals(tokens, labels, n_codes=6)
    classes = torch.tensor([0] * 20000 + [1] * 5 + [-1] * 20000)
    draws = marginal_token_samples(f, classes, make_generator(0))
    assert draws.shape == (40005, 2) and draws.dtype == torch.long
    c0, c1, un = draws[:20000], draws[20000:20005], draws[20005:]
    assert (c0[:, 0] == 3).all() and set(c0[:, 1].tolist()) == {1, 2}  # codes never seen are never drawn
    assert (c0[:, 1] == 2).double().mean() == pytest.approx(0.75, abs=0.015)
    assert (c1 == torch.tensor([0, 5])).all()
    # unconditional: the pooled frequencies, the two positions drawn independently: in the data code 0 always comes
    # with code 5, independent draws pair it with another code in 1/3 × 2/3 of the fields
    assert (un[:, 0] == 0).double().mean() == pytest.approx(1 / 3, abs=0.015)
    broken = ((un[:, 0] == 0) & (un[:, 1] != 5)).double().mean()
    assert broken == pytest.approx(1 / 3 * 2 / 3, abs=0.015)
    # seeded, and each class one block: where the entries sit does not matter
    perm = torch.randperm(len(classes), generator=make_generator(1))
    again = marginal_token_samples(f, classes[perm], make_generator(0))
    for c in (-1, 0, 1):
        assert torch.equal(draws[classes == c], again[classes[perm] == c])
    assert not torch.equal(draws, marginal_token_samples(f, classes, make_generator(1)))


def test_marginal_bad_input_is_a_clear_error():
    tokens, labels = _token_data()
    with pytest.raises(NfgenError, match="class 1 has no training sequences"):
        token_marginals(tokens, torch.tensor([0] * 59 + [2]), n_codes=6)
    with pytest.raises(NfgenError, match="code ids in \\[0, 4\\)"):
        token_marginals(tokens, labels, n_codes=4)
    with pytest.raises(NfgenError, match="tokens \\[N, L\\] and labels \\[N\\]"):
        token_marginals(tokens, labels[:-1], n_codes=6)
    f = token_marginals(tokens, labels, n_codes=6)
    with pytest.raises(NfgenError, match="class ids must be in \\[-1, 2\\)"):
        marginal_token_samples(f, torch.tensor([2]), make_generator(0))


def _class_pca_tokens():
    spec = SirenSpec(hidden=8, hidden_layers=2)
    g = make_generator(5)
    labels = torch.arange(240) % 3
    w = siren_init(spec, 240, generator=g) * (1 + 0.1 * torch.randn(240, spec.num_params, generator=g))
    w = w + 0.2 * torch.randn(3, spec.num_params, generator=g)[labels]
    tok = WeightTokenizer.fit(w, spec, TokenizerConfig(codebook_size=16, iters=6, basis="class-pca", center="class"),
                              labels=labels)
    return tok, tok.encode(w, labels), labels, spec


def test_marginal_weights_decode_as_generate_does():
    tok, tokens, labels, spec = _class_pca_tokens()
    classes = torch.tensor([0] * 5 + [2] * 4 + [-1] * 6)
    sampled = marginal_token_weights(tok, tokens, labels, classes, seed=3)
    # unconditional entries get the class generate_weights would draw for them, then that class's frequencies
    drawn = tok.draw_classes(classes, make_generator(3 + CLASS_DRAW_SEED_OFFSET))
    assert (drawn >= 0).all() and torch.equal(drawn[:9], classes[:9])
    want = tok.decode(marginal_token_samples(token_marginals(tokens, labels, tok.n_codes), drawn, make_generator(3)),
                      drawn)
    assert sampled.shape == (15, spec.num_params) and torch.equal(sampled, want)
    # expected values everywhere: decoding is linear, so each field is its class's mean de-tokenized field
    expected = marginal_token_weights(tok, tokens, labels, classes, seed=3, weights="expected")
    detok = tok.decode(tokens, labels).double()
    class_means = torch.stack([detok[labels == c].mean(0) for c in range(3)]).float()
    torch.testing.assert_close(expected, class_means[drawn], atol=1e-5, rtol=1e-5)
    # expected from the last position on: every other token the drawn one
    partial = marginal_token_weights(tok, tokens, labels, classes, seed=3, weights="expected",
                                     expected_from=tok.tokens_per_field)
    torch.testing.assert_close(partial, sampled, atol=1e-5, rtol=1e-5)


def test_smoothed_bootstrap_copies_a_row_and_jitters_it():
    x, labels = _data()
    classes = torch.tensor([0] * 30000 + [-1] * 30000)
    copies = smoothed_bootstrap(x.float(), labels, classes, 0.0, make_generator(0))
    assert copies.dtype == torch.float64
    rows = x.float().double()
    assert (torch.cdist(copies[:30000], rows[labels == 0]).min(1).values == 0).all()  # bandwidth 0: exact copies
    assert (torch.cdist(copies[30000:], rows).min(1).values == 0).all()
    draws = smoothed_bootstrap(x, labels, classes, 0.5, make_generator(0))
    for sel, got in ((labels == 0, draws[:30000]), (torch.ones_like(labels, dtype=torch.bool), draws[30000:])):
        ref = x[sel]
        # a uniform row has the class's mean and (ddof 0) variance; the kernel adds 0.25 of the (ddof 1) variance
        torch.testing.assert_close(got.mean(0), ref.mean(0), atol=0.03 * float(ref.std(0).max()), rtol=0)
        want_var = ref.var(0, unbiased=False) + 0.25 * ref.var(0)
        torch.testing.assert_close(got.var(0), want_var, rtol=0.05, atol=0)
    perm = torch.randperm(len(classes), generator=make_generator(1))
    again = smoothed_bootstrap(x, labels, classes[perm], 0.5, make_generator(0))
    for c in (-1, 0):
        assert torch.equal(draws[classes == c], again[classes[perm] == c])
    with pytest.raises(NfgenError, match="bandwidth must be ≥ 0"):
        smoothed_bootstrap(x, labels, classes, -0.1, make_generator(0))
    with pytest.raises(NfgenError, match="class 7 has 0 example"):
        smoothed_bootstrap(x, labels, torch.tensor([7]), 0.5, make_generator(0))


def test_bootstrap_token_weights_copy_training_fields_and_share_the_marginals_tail():
    tok, tokens, labels, spec = _class_pca_tokens()
    classes = torch.tensor([0] * 4 + [1] * 3 + [-1] * 5)
    copies = bootstrap_token_weights(tok, tokens, labels, classes, seed=2, bandwidth=0.0)
    drawn = tok.draw_classes(classes, make_generator(2 + CLASS_DRAW_SEED_OFFSET))
    detok = tok.decode(tokens, labels)
    for i, c in enumerate(drawn.tolist()):  # bandwidth 0, every position drawn: a de-tokenized field of its class
        assert float((detok[labels == c] - copies[i]).abs().max(1).values.min()) < 1e-5, i
    jittered = bootstrap_token_weights(tok, tokens, labels, classes, seed=2, bandwidth=0.5)
    assert float((jittered - copies).abs().max()) > 1e-3
    # expected values everywhere: nothing is copied, the class's mean field as in the marginals baseline
    torch.testing.assert_close(
        bootstrap_token_weights(tok, tokens, labels, classes, seed=2, weights="expected"),
        marginal_token_weights(tok, tokens, labels, classes, seed=2, weights="expected"), atol=1e-5, rtol=1e-5)
    with pytest.raises(NfgenError, match="class 5 has no training fields"):
        bootstrap_token_weights(tok, tokens, labels, torch.tensor([5]), seed=0)


@pytest.mark.parametrize("coarse", [0, 3])  # coarse tokens (--coarse) ride along: never decoded
def test_token_baselines_draw_a_mode_then_treat_it_as_the_class(coarse):
    spec = SirenSpec(hidden=8, hidden_layers=2)
    g = make_generator(7)
    labels = torch.arange(240) % 3
    planted = (torch.arange(240) // 3) % 2
    w = siren_init(spec, 240, generator=g) * (1 + 0.1 * torch.randn(240, spec.num_params, generator=g))
    w = w + 0.2 * torch.randn(3, 2, spec.num_params, generator=g)[labels, planted]
    cfg = TokenizerConfig(codebook_size=16, iters=6, basis="class-pca", center="class", modes=2, coarse=coarse)
    tok = WeightTokenizer.fit(w, spec, cfg, labels=labels)
    tokens = tok.encode(w, labels)
    assert tokens.shape[1] == 1 + coarse + spec.num_params
    groups = labels * 2 + tokens[:, 0]
    classes = torch.tensor([0] * 300 + [2] * 300 + [-1] * 6)
    drawn_classes = tok.draw_classes(classes, make_generator(3 + CLASS_DRAW_SEED_OFFSET))
    train_groups, sample_groups = modes_as_classes(tok, tokens, labels, drawn_classes, seed=3)
    assert torch.equal(train_groups, groups) and torch.equal(sample_groups // 2, drawn_classes)
    for c, block in ((0, slice(0, 300)), (2, slice(300, 600))):  # modes as often as in the class's training fields
        share = float((sample_groups[block] % 2 == 0).double().mean())
        assert abs(share - float((tokens[labels == c, 0] == 0).double().mean())) < 0.1
    # every marginal draw is a sequence of its group's: each token seen at its position in the (class, mode)
    sampled = marginal_token_weights(tok, tokens, labels, classes, seed=3)
    seqs = marginal_token_samples(token_marginals(tokens, train_groups, tok.n_codes), sample_groups,
                                  make_generator(3))
    assert torch.equal(seqs[:, 0], sample_groups % 2)
    torch.testing.assert_close(sampled, tok.decode(seqs, drawn_classes), rtol=0, atol=0)
    for i in (0, 301, 605):
        seen = tokens[groups == sample_groups[i]]
        assert all(bool((seen[:, p] == seqs[i, p]).any()) for p in range(seqs.shape[1]))
    # expected values everywhere but the mode, which keeps its draw: each field its (class, mode)'s mean field
    expected = marginal_token_weights(tok, tokens, labels, classes, seed=3, weights="expected")
    detok = tok.decode(tokens, labels).double()
    means = torch.stack([detok[groups == k].mean(0) for k in range(6)]).float()
    torch.testing.assert_close(expected, means[sample_groups], atol=1e-5, rtol=1e-5)
    # the bootstrap at bandwidth 0 copies a training field of the drawn class and mode
    copies = bootstrap_token_weights(tok, tokens, labels, classes[::50], seed=2, bandwidth=0.0)
    _, boot_groups = modes_as_classes(tok, tokens, labels, tok.draw_classes(classes[::50], make_generator(
        2 + CLASS_DRAW_SEED_OFFSET)), seed=2)
    for i, k in enumerate(boot_groups.tolist()):
        assert float((detok[groups == k].float() - copies[i]).abs().max(1).values.min()) < 1e-5, i


def test_bootstrap_jitters_a_mode_of_one_field_by_its_class_spread():
    spec = SirenSpec(hidden=8, hidden_layers=2)
    g = make_generator(8)
    labels = torch.arange(60) % 3
    w = siren_init(spec, 60, generator=g) * (1 + 0.1 * torch.randn(60, spec.num_params, generator=g))
    w[0] += 3.0  # an outlier of class 0: a mode of its own
    tok = WeightTokenizer.fit(w, spec, TokenizerConfig(codebook_size=16, iters=4, basis="class-pca", center="class",
                                                       modes=2), labels=labels)
    tokens = tok.encode(w, labels)
    assert int((tokens[labels == 0, 0] == tokens[0, 0]).sum()) == 1
    classes = torch.zeros(400, dtype=torch.long)
    copies = bootstrap_token_weights(tok, tokens, labels, classes, seed=1, bandwidth=0.0)
    jittered = bootstrap_token_weights(tok, tokens, labels, classes, seed=1, bandwidth=0.5)
    outlier = (copies - tok.decode(tokens[:1], labels[:1])).abs().max(1).values < 1e-5
    assert 0 < int(outlier.sum()) < 400 and torch.isfinite(jittered).all()  # drawn about 1 time in 20
    assert float((jittered[outlier] - copies[outlier]).abs().max()) > 1e-3  # and still jittered
