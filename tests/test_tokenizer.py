"""The tokenize stage: encode/decode, group and residual levels, backends agree, artifacts, bad input."""
import math
from dataclasses import replace

import pytest
import torch

from nfgen.io import NfgenError, save_artifact
from nfgen.tokenizer import TokenizerConfig, TokenSet, WeightTokenizer, load_tokens, run_tokenize, save_tokens
from nfkernels import SirenSpec, siren_init
from nfkernels import _ext
from nfkernels.vq import vq_assign_reference

SPEC = SirenSpec(hidden=8, hidden_layers=2)  # P = 16 + 8 + 64 + 8 + 8 + 1 = 105 = 3*5*7


def _weights(n=6, spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    return siren_init(spec, n, generator=g) * (1 + 0.1 * torch.randn(n, spec.num_params, generator=g))


@pytest.fixture(scope="module")
def mnist_fields(tmp_path_factory, data_root):
    """A real (short) fit of 12 MNIST digits with the default architecture."""
    from nfgen.fields import FitConfig, run_fit

    path = tmp_path_factory.mktemp("tok") / "fields.safetensors"
    run_fit("mnist:test[:12]", path, FitConfig(steps=50, quiet=True), data_root=data_root)
    return path


@pytest.mark.parametrize("center", ["mean", "none"])
@pytest.mark.parametrize("normalize", ["none", "layer"])
def test_decode_of_encode_is_the_nearest_codes(normalize, center):
    w = _weights()
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=5, normalize=normalize,
                                                       center=center))
    tokens = tok.encode(w)
    assert tokens.shape == (6, SPEC.num_params) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < tok.n_codes == 16
    mean = w.double().mean(0).float() if center == "mean" else torch.zeros(SPEC.num_params)
    torch.testing.assert_close(tok.center, mean, rtol=0, atol=0)
    scale = tok.scale_vector()
    nearest = vq_assign_reference(((w - mean) / scale).reshape(-1, 1), tok.codebooks[0])
    torch.testing.assert_close(tok.decode(tokens), tok.codebooks[0][nearest].reshape(w.shape) * scale + mean,
                               rtol=0, atol=0)
    assert torch.equal(tok.encode(tok.decode(tokens)), tokens)  # decoded weights sit on their codes
    if normalize == "layer":  # every centred tensor scaled to unit std over the dataset
        for t, s in zip(SPEC.param_layout(), tok.scales):
            part = (w - mean)[:, t["offset"]:t["offset"] + t["numel"]]
            assert float(s) == pytest.approx(float(part.std(unbiased=False)), rel=1e-5)


def test_centering_resolves_small_offsets_from_a_shared_template():
    # fields fitted from one template: every field is the template plus a small offset of its own
    g = torch.Generator().manual_seed(1)
    template = siren_init(SPEC, 1, generator=g)
    w = template + 0.02 * template.abs().mean() * torch.randn(40, SPEC.num_params, generator=g)
    err = {}
    for center in ("mean", "none"):
        tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=10, center=center))
        err[center] = float((tok.decode(tok.encode(w)) - w).pow(2).mean())
    assert err["mean"] < 0.1 * err["none"], err


def test_group_and_levels_layout():
    w = _weights()
    cfg = TokenizerConfig(codebook_size=8, group=3, levels=3, iters=3)
    tok = WeightTokenizer.fit(w, SPEC, cfg)
    assert tok.tokens_per_field == SPEC.num_params // 3 * 3 and tok.n_codes == 24
    assert tok.bits_per_field == tok.tokens_per_field * 3
    tokens = tok.encode(w)
    level = torch.arange(tok.tokens_per_field) % 3  # a vector's 3 tokens are consecutive, level j in [8j, 8j+8)
    assert ((tokens >= 8 * level) & (tokens < 8 * level + 8)).all()
    assert tok.decode(tokens).shape == w.shape
    bad = tokens.clone()
    bad[0, 1] = 0  # a level-0 id at a level-1 position
    with pytest.raises(NfgenError, match="level"):
        tok.decode(bad)


def test_token_roles_name_the_neurons_each_weight_joins():
    """2→2→1: nodes 0-1 inputs, 2-3 hidden neurons, 4 the output, 5 the biases' source."""
    spec = SirenSpec(hidden=2, hidden_layers=1)

    def roles(**cfg):
        tok = WeightTokenizer(spec, TokenizerConfig(codebook_size=4, **cfg), torch.zeros(cfg.get("levels", 1), 4,
                              cfg.get("group", 1)), torch.ones(4))
        assert tok.n_role_nodes == 6 and len(tok.token_roles()) == tok.tokens_per_field
        return tok.token_roles().tolist()

    edges = [[0, 2], [1, 2], [0, 3], [1, 3], [5, 2], [5, 3], [2, 4], [3, 4], [5, 4]]  # W0 (row-major), b0, W1, b1
    assert roles() == edges
    assert roles(group=3) == edges[::3]  # a vector's first weight
    assert roles(levels=2) == [e for e in edges for _ in range(2)]  # a vector's residual tokens share it
    big = WeightTokenizer(SirenSpec(), TokenizerConfig(), torch.zeros(1, 256, 1), torch.ones(6))
    r = big.token_roles()  # the default SIREN: W1[i, j] joins hidden neuron j of layer 1 to neuron i of layer 2
    assert big.n_role_nodes == 2 + 32 + 32 + 1 + 1 and r.shape == (1185, 2)
    assert r[96 + 5 * 32 + 7].tolist() == [2 + 7, 34 + 5] and r[2 * 7].tolist() == [0, 2 + 7]


def test_residual_levels_reduce_error():
    w = _weights(n=8)
    errs = []
    for levels in (1, 2, 3):
        tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=8, levels=levels, iters=10))
        errs.append(float((tok.decode(tok.encode(w)) - w).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[1] < 0.5 * errs[0]


@pytest.mark.parametrize("group", [1, 3])
def test_same_tokens_with_every_backend(group):
    w = _weights(n=4)
    results = {}
    for backend in ("torch", "cpp", "triton"):
        if backend == "cpp" and not _ext.has_op("vq_assign"):
            continue
        if backend == "triton" and not (_ext.HAS_TRITON and _ext.triton_interpret()):
            continue
        cfg = TokenizerConfig(codebook_size=16, group=group, iters=4, backend=backend)
        tok = WeightTokenizer.fit(w, SPEC, cfg)
        results[backend] = (tok.codebooks, tok.encode(w))
    ref_codes, ref_tokens = results.pop("torch")
    assert results, "no fast backend to compare"
    for backend, (codes, tokens) in results.items():
        torch.testing.assert_close(codes, ref_codes, rtol=1e-6, atol=1e-7, msg=backend)
        assert torch.equal(tokens, ref_tokens), backend


def _low_rank_fields(n=300, rank=6, seed=2):
    """Fields that vary around a template along a few directions, like fields fitted from one init."""
    g = torch.Generator().manual_seed(seed)
    template = siren_init(SPEC, 1, generator=g)
    directions = torch.linalg.qr(torch.randn(SPEC.num_params, rank, generator=g, dtype=torch.float64))[0].float()
    z = torch.randn(n, rank, generator=g) * torch.linspace(0.05, 0.01, rank)
    return template + z @ directions.T + 1e-4 * torch.randn(n, SPEC.num_params, generator=g)


@pytest.mark.parametrize("group,levels", [(1, 1), (3, 1), (1, 2)])
def test_pca_basis_tokens_are_standardised_principal_components(group, levels):
    w = _low_rank_fields()
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=6, basis="pca", group=group,
                                                       levels=levels))
    assert tok.tokens_per_field == SPEC.num_params // group * levels
    eye = torch.eye(SPEC.num_params)
    torch.testing.assert_close(tok.basis.T @ tok.basis, eye, atol=2e-5, rtol=0)  # orthonormal columns
    assert bool((tok.basis_stds[:-1] >= tok.basis_stds[1:]).all())  # largest variance first
    torch.testing.assert_close(tok.center, w.double().mean(0).float(), atol=1e-6, rtol=0)
    # before quantising, each component of the training fields has mean 0 and std 1 (up to the 6-dim rank, after
    # which the stds stop at PCA_MIN_STD of the first and the components are ~0)
    comps = tok._vectors(w).reshape(w.shape[0], SPEC.num_params)
    torch.testing.assert_close(comps[:, :6].mean(0), torch.zeros(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(comps[:, :6].std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    tokens = tok.encode(w)
    torch.testing.assert_close(tok.decode(tokens), tok.decode_vectors(tok.code_vectors()[tokens]), rtol=0, atol=0)
    # the codes resolve what differs between fields: 16 codes leave a small fraction of the offsets' variance
    # (16 codes for 3-dim vectors of unit-variance components, a quarter of it)
    offsets = (w - tok.center).pow(2).mean()
    assert float((tok.decode(tokens) - w).pow(2).mean()) < (0.05 if group == 1 else 0.4) * float(offsets)


def test_pca_basis_beats_raw_codes_on_fields_from_a_template():
    w = _low_rank_fields()
    err = {basis: float((lambda t: (t.decode(t.encode(w)) - w).pow(2).mean())(
        WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=8, basis=basis)))) for basis in
        ("weights", "pca")}
    assert err["pca"] < 0.05 * err["weights"], err


def test_pca_basis_options_and_artifacts(tmp_path):
    with pytest.raises(NfgenError, match="basis"):
        TokenizerConfig(basis="svd").validate()
    with pytest.raises(NfgenError, match="--center"):
        TokenizerConfig(basis="pca", center="mean").validate()
    TokenizerConfig(basis="pca", center="class").validate()  # the pca of the offsets from the class means
    TokenizerConfig(basis="class-pca", center="class").validate()
    with pytest.raises(NfgenError, match="--center class"):
        TokenizerConfig(basis="class-pca").validate()
    w = _low_rank_fields(n=40)  # fewer fields than weights: the missing directions keep a floor std
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=4, basis="pca"))
    assert bool((tok.basis_stds > 0).all()) and torch.isfinite(tok.decode(tok.encode(w))).all()
    with pytest.raises(NfgenError, match="principal components"):
        tok.token_roles()
    ts = TokenSet(tok.encode(w), torch.zeros(40, dtype=torch.long), tok, SPEC, (4, 4))
    path = save_tokens(tmp_path / "t.safetensors", ts)
    loaded = load_tokens(path)
    assert loaded.tokenizer.cfg.basis == "pca"
    torch.testing.assert_close(loaded.tokenizer.decode(loaded.tokens), tok.decode(ts.tokens), rtol=0, atol=0)
    from nfgen.io import load_artifact

    tensors, meta = load_artifact(path, "tokens")
    del tensors["basis"]  # a pca tokens file without its basis cannot decode
    save_artifact(tmp_path / "bad.safetensors", "tokens", tensors, meta)
    with pytest.raises(NfgenError, match="invalid tokenizer"):
        load_tokens(tmp_path / "bad.safetensors")


def _class_fields(n=300, n_classes=3, seed=4):
    """Fields around a template whose class moves them far (one offset per class) and whose own spread is small."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    shifts = 0.2 * torch.randn(n_classes, SPEC.num_params, generator=g)
    return _low_rank_fields(n=n, seed=seed) + shifts[labels], labels, shifts


def _class_fields_of_own_shape(n=300, n_classes=3, seed=5):
    """_class_fields, each class also varying along its own directions: where the class-pca basis differs from
    the pooled pca's."""
    w, labels, shifts = _class_fields(n, n_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    own = torch.randn(n_classes, 4, SPEC.num_params, generator=g) * 0.005
    return w + torch.einsum("nk,nkp->np", torch.randn(n, 4, generator=g), own[labels]), labels, shifts


@pytest.mark.parametrize("basis", ["weights", "pca", "class-pca"])
def test_class_centring_quantises_offsets_from_the_class_mean(basis):
    w, labels, _ = _class_fields_of_own_shape()
    cfg = TokenizerConfig(codebook_size=16, iters=8, basis=basis, center="class", shrinkage=0.0)
    tok = WeightTokenizer.fit(w, SPEC, cfg, labels=labels)
    assert tok.needs_classes
    for c in range(3):
        torch.testing.assert_close(tok.class_centers[c], w[labels == c].double().mean(0).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(tok.class_prior, torch.full((3,), 1 / 3))
    tokens = tok.encode(w, labels)
    detok = tok.decode(tokens, labels)
    torch.testing.assert_close(detok, tok.decode_vectors(tok.code_vectors()[tokens], labels), rtol=0, atol=0)
    # the same tokens under another class are that class's field: moved by the offset between the class means
    # (exactly, with one basis for all classes), and turned by the other class's basis with class-pca
    other = (labels + 1) % 3
    shift = tok.class_centers[other] - tok.class_centers[labels]
    if basis == "class-pca":
        assert float((tok.decode(tokens, other) - detok - shift).abs().max()) > 1e-2
    else:
        torch.testing.assert_close(tok.decode(tokens, other) - detok, shift, atol=1e-5, rtol=0)
    # the class shifts dwarf the within-class spread, so codes for the whole range resolve the fields far worse
    plain = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=8,
                                                         basis="weights" if basis == "weights" else "pca"))
    err = float((detok - w).pow(2).mean())
    assert err < 0.1 * float((plain.decode(plain.encode(w)) - w).pow(2).mean())
    comps = tok._vectors(w, labels).reshape(w.shape[0], -1)
    eye = torch.eye(SPEC.num_params)
    if basis == "pca":  # principal components of the within-class offsets, pooled: unit std, orthonormal directions
        torch.testing.assert_close(comps[:, :6].std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
        torch.testing.assert_close(tok.basis.T @ tok.basis, eye, atol=2e-5, rtol=0)
    if basis == "class-pca":  # each class's own: unit std within every class, an orthonormal basis per class
        assert tok.basis.shape == (3, SPEC.num_params, SPEC.num_params) and tok.basis_stds.shape == (3, SPEC.num_params)
        for c in range(3):
            torch.testing.assert_close(comps[labels == c][:, :6].std(0, unbiased=False), torch.ones(6), atol=1e-3,
                                       rtol=0)
            torch.testing.assert_close(tok.basis[c].T @ tok.basis[c], eye, atol=2e-5, rtol=0)
            _, directions, stds = WeightTokenizer.principal_basis(w[labels == c])
            torch.testing.assert_close(tok.basis_stds[c], stds)


def test_class_pca_mixes_in_the_pooled_covariance():
    w, labels, _ = _class_fields_of_own_shape()
    offsets = (w - torch.stack([w[labels == c].mean(0) for c in range(3)])[labels]).double()
    pooled = offsets.T @ offsets / len(offsets)
    for shrinkage in (0.3, 1.0):
        tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=2, basis="class-pca", center="class",
                                                           shrinkage=shrinkage), labels=labels)
        for c in range(3):
            rows = offsets[labels == c]
            want = (1 - shrinkage) * rows.T @ rows / len(rows) + shrinkage * pooled
            basis, var = tok.basis[c].double(), tok.basis_stds[c].double() ** 2
            torch.testing.assert_close(basis @ torch.diag(var) @ basis.T, want, atol=1e-6, rtol=1e-4)
    with pytest.raises(NfgenError, match="shrinkage"):
        TokenizerConfig(basis="class-pca", center="class", shrinkage=1.5).validate()


def test_class_centring_needs_classes_and_draws_unconditional_ones(tmp_path):
    w, labels, _ = _class_fields()
    labels = torch.where(torch.arange(len(labels)) < 200, 0, labels)  # class 0: 200 + 34 fields of 300
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=4, center="class"), labels=labels)
    tokens = tok.encode(w, labels)
    with pytest.raises(NfgenError, match="class"):
        tok.decode(tokens)  # no classes
    with pytest.raises(NfgenError, match=r"class ids must be in \[0, 3\)"):
        tok.decode(tokens[:2], torch.tensor([0, -1]))
    with pytest.raises(NfgenError, match="one class per field"):
        tok.encode(w, labels[:5])
    # a class without fields (class 1 of labels * 2, class 5 past them) centres on the mean of all fields and
    # is never drawn
    sparse = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=2, center="class"),
                                 labels=labels * 2, n_classes=6)
    torch.testing.assert_close(sparse.class_centers[[1, 3, 5]], w.mean(0).expand(3, -1), atol=1e-6, rtol=0)
    assert sparse.class_prior[[1, 3, 5]].tolist() == [0, 0, 0]
    assert set(sparse.draw_classes(torch.full((500,), -1), torch.Generator()).tolist()) == {0, 2, 4}
    with pytest.raises(NfgenError, match="class for every field"):
        WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, center="class"), labels=labels - 1)
    with pytest.raises(NfgenError, match="classes"):
        WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, center="class"))
    # unconditional entries (-1) draw classes from the training frequencies; the others keep theirs
    classes = torch.tensor([2, 1] + [-1] * 6000)
    drawn = tok.draw_classes(classes, torch.Generator().manual_seed(0))
    assert drawn[:2].tolist() == [2, 1] and int(drawn.min()) >= 0
    freq = torch.bincount(drawn[2:], minlength=3).float() / 6000
    torch.testing.assert_close(freq, torch.bincount(labels).float() / 300, atol=0.02, rtol=0)
    plain = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=2))
    assert torch.equal(plain.draw_classes(classes, torch.Generator()), classes)
    # artifacts keep the class means and frequencies; a file without them does not load
    path = save_tokens(tmp_path / "t.safetensors", TokenSet(tokens, labels, tok, SPEC, (4, 4)))
    loaded = load_tokens(path).tokenizer
    torch.testing.assert_close(loaded.decode(tokens, labels), tok.decode(tokens, labels), rtol=0, atol=0)
    torch.testing.assert_close(loaded.class_prior, tok.class_prior, rtol=0, atol=0)
    from nfgen.io import load_artifact

    tensors, meta = load_artifact(path, "tokens")
    del tensors["class_centers"]
    save_artifact(tmp_path / "bad.safetensors", "tokens", tensors, meta)
    with pytest.raises(NfgenError, match="invalid tokenizer"):
        load_tokens(tmp_path / "bad.safetensors")


def _moded_fields(n=300, n_classes=3, modes=2, seed=6):
    """_class_fields, each class made of `modes` clusters far apart: field i is in cluster (i // n_classes) % modes."""
    w, labels, _ = _class_fields(n, n_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    planted = (torch.arange(n) // n_classes) % modes
    return w + 0.1 * torch.randn(n_classes, modes, SPEC.num_params, generator=g)[labels, planted], labels, planted


@pytest.mark.parametrize("basis", ["weights", "class-pca"])
def test_modes_split_each_class_and_lead_its_tokens(basis, tmp_path):
    w, labels, planted = _moded_fields(modes=3)
    cfg = TokenizerConfig(codebook_size=16, iters=8, basis=basis, center="class", modes=3)
    tok = WeightTokenizer.fit(w, SPEC, cfg, labels=labels)
    assert tok.class_centers.shape == (9, SPEC.num_params) and tok.class_prior.shape == (3,)
    modes = tok.assign_modes(w, labels)
    for c in range(3):  # k-means finds the planted clusters (up to their names), and each mode's mean is its fields'
        rows = labels == c
        assert len(set(zip(modes[rows].tolist(), planted[rows].tolist()))) == 3
        for m in range(3):
            mine = w[rows & (modes == m)]
            torch.testing.assert_close(tok.class_centers[3 * c + m], mine.double().mean(0).float(), atol=1e-6, rtol=0)
    tokens = tok.encode(w, labels)
    assert tokens.shape == (300, 1 + SPEC.num_params) == (300, tok.tokens_per_field)
    assert torch.equal(tokens[:, 0], modes) and torch.equal(tok.modes_of(tokens), modes)
    assert tok.token_ranges()[0].tolist() == [0, 3] and tok.token_ranges()[1:].tolist() == [[0, 16]] * SPEC.num_params
    detok = tok.decode(tokens, labels)
    torch.testing.assert_close(detok, tok.decode_vectors(tok.code_vectors()[tokens], labels, modes), rtol=0, atol=0)
    # the mode's mean is taken out: the within-mode spread is all the codes resolve, far finer than one class mean
    one = WeightTokenizer.fit(w, SPEC, replace(cfg, modes=1), labels=labels)
    err = float((detok - w).pow(2).mean())
    assert err < 0.2 * float((one.decode(one.encode(w, labels), labels) - w).pow(2).mean())
    # another mode of the same class is another field: decoded around that mode's mean (and in its basis)
    moved = tok.decode(torch.cat([(tokens[:, :1] + 1) % 3, tokens[:, 1:]], 1), labels)
    assert float((moved - detok).abs().mean()) > 0.05
    with pytest.raises(NfgenError, match="mode"):
        tok.decode_vectors(tok.code_vectors()[tokens], labels)  # modes not passed
    with pytest.raises(NfgenError, match="outside their position's id range"):
        tok.decode(torch.cat([torch.full((300, 1), 3), tokens[:, 1:]], 1), labels)
    # artifacts keep the modes' means (and bases): the same decode after loading
    path = save_tokens(tmp_path / "t.safetensors", TokenSet(tokens, labels, tok, SPEC, (4, 4)))
    loaded = load_tokens(path)
    assert loaded.tokenizer.cfg.modes == 3 and torch.equal(loaded.tokens, tokens)
    torch.testing.assert_close(loaded.tokenizer.decode(tokens, labels), detok, rtol=0, atol=0)


def test_modes_options_are_checked():
    w, labels, _ = _moded_fields(n=30)
    with pytest.raises(NfgenError, match="--modes 0"):
        TokenizerConfig(modes=0).validate()
    with pytest.raises(NfgenError, match="--center class"):
        TokenizerConfig(modes=2, center="mean").validate()
    with pytest.raises(NfgenError, match="exceeds --codebook-size"):
        TokenizerConfig(modes=20, codebook_size=16, center="class").validate()
    few = torch.where(torch.arange(30) < 27, labels, 3)  # class 3: 3 fields
    with pytest.raises(NfgenError, match="class 3 has 3 field"):
        WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=2, center="class", modes=4), labels=few)
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=2, center="class", modes=2),
                              labels=labels)
    with pytest.raises(NfgenError, match="mode token"):
        tok.token_roles()
    with pytest.raises(NfgenError, match="do not match the tokenizer's architecture"):
        tok.encode(w[:, :5], labels)  # refused before a mode is looked for
    with pytest.raises(NfgenError, match=r"modes must be \[30\] ids in \[0, 2\)"):
        tok.decode_vectors(tok.code_vectors()[tok.encode(w, labels)], labels, torch.full((30,), 2))



@pytest.mark.parametrize("modes", [1, 3])
def test_coarse_tokens_bin_the_leading_codes_and_decode_to_nothing(modes, tmp_path):
    w, labels, _ = _moded_fields(modes=3)
    k, P = 5, SPEC.num_params
    cfg = TokenizerConfig(codebook_size=32, iters=8, basis="class-pca", center="class", modes=modes)
    plain = WeightTokenizer.fit(w, SPEC, cfg, labels=labels)
    tok = WeightTokenizer.fit(w, SPEC, replace(cfg, coarse=k, coarse_levels=4), labels=labels)
    lead = int(modes > 1)
    assert torch.equal(tok.codebooks, plain.codebooks)  # the bins change the layout, not the codes
    assert tok.tokens_per_field == lead + k + P and tok.n_components == P
    assert tok.bits_per_field == plain.bits_per_field  # a bin is a function of its code
    assert [tok.token_position(i) for i in (0, 1, k, k + 1, P)] == [lead, lead + 2, lead + 2 * k, lead + 2 * k + 1,
                                                                      tok.tokens_per_field]
    codes_at = tok.code_positions()
    assert codes_at.tolist() == [lead + 2 * i + 1 for i in range(k)] + list(range(lead + 2 * k, lead + k + P))
    tokens, ref = tok.encode(w, labels), plain.encode(w, labels)
    assert torch.equal(tokens[:, :lead], ref[:, :lead]) and torch.equal(tokens[:, codes_at], ref[:, lead:])
    # each bin: how many of the standard normal's quartiles (-0.674, 0, 0.674) the coded value lies above
    value = tok.codebooks[0, tokens[:, codes_at[:k]], 0]
    quartiles = torch.tensor([-0.6745, 0.0, 0.6745])
    assert torch.equal(tokens[:, lead:lead + 2 * k:2], (value[..., None] > quartiles).sum(-1))
    assert set(tokens[:, lead].tolist()) == {0, 1, 2, 3}  # standardised components fill every bin
    ranges = tok.token_ranges()
    assert ranges[lead:lead + 2 * k:2].tolist() == [[0, 4]] * k and ranges[codes_at].tolist() == [[0, 32]] * P
    assert ranges[:lead].tolist() == [[0, modes]] * lead
    detok = tok.decode(tokens, labels)
    torch.testing.assert_close(detok, plain.decode(ref, labels), rtol=0, atol=0)
    vectors = tok.code_vectors()[tokens]
    vectors[:, lead:lead + 2 * k:2] = 1e3  # decoding never reads a coarse position
    torch.testing.assert_close(tok.decode_vectors(vectors, labels, tok.modes_of(tokens)), detok, rtol=0, atol=0)
    with pytest.raises(NfgenError, match="coarse token in \\[0, 4\\)"):
        tok.decode(torch.cat([tokens[:, :lead], torch.full((300, 1), 4), tokens[:, lead + 1:]], 1), labels)
    loaded = load_tokens(save_tokens(tmp_path / "t.safetensors", TokenSet(tokens, labels, tok, SPEC, (4, 4))))
    assert (loaded.tokenizer.cfg.coarse, loaded.tokenizer.cfg.coarse_levels) == (k, 4)
    torch.testing.assert_close(loaded.tokenizer.decode(tokens, labels), detok, rtol=0, atol=0)


def test_coarse_options_are_checked():
    for cfg, pattern in ((dict(coarse=-1), "--coarse -1 is invalid"),
                         (dict(coarse=4), "use it with --basis pca or class-pca"),
                         (dict(coarse=4, basis="pca", levels=2), "--group 1 and --levels 1"),
                         (dict(coarse=4, basis="pca", coarse_levels=1), "--coarse-levels 1 is invalid"),
                         (dict(coarse=4, basis="pca", codebook_size=16, coarse_levels=17), "--coarse-levels 17")):
        with pytest.raises(NfgenError, match=pattern):
            TokenizerConfig(**cfg).validate()
    with pytest.raises(NfgenError, match="--coarse 106 exceeds the 105 components"):
        TokenizerConfig(coarse=106, basis="pca").validate(SPEC.num_params)


def test_fit_is_deterministic():
    w = _weights()
    cfg = TokenizerConfig(codebook_size=16, iters=5, seed=3)
    a, b = WeightTokenizer.fit(w, SPEC, cfg), WeightTokenizer.fit(w, SPEC, cfg)
    assert torch.equal(a.codebooks, b.codebooks)


def test_bad_options_and_weights():
    w = _weights()
    with pytest.raises(NfgenError, match=r"does not divide the 105 weights.*\[1, 3, 5, 7, 15\]"):
        WeightTokenizer.fit(w, SPEC, TokenizerConfig(group=2))
    with pytest.raises(NfgenError, match="normalisation"):
        TokenizerConfig(normalize="batch").validate()
    with pytest.raises(NfgenError, match="centring"):
        TokenizerConfig(center="median").validate()
    bad = w.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(NfgenError, match="NaN"):
        WeightTokenizer.fit(bad, SPEC, TokenizerConfig(codebook_size=8))
    with pytest.raises(NfgenError, match="cannot fill"):
        WeightTokenizer.fit(w[:1], SPEC, TokenizerConfig(codebook_size=256))


def test_run_tokenize_on_real_fields(mnist_fields, tmp_path, data_root):
    out = tmp_path / "tokens.safetensors"
    cfg = TokenizerConfig(codebook_size=64, iters=8, quiet=True)
    summary = run_tokenize(mnist_fields, out, cfg, data_root=data_root, device="cpu", quiet=True)
    ts = load_tokens(out)
    assert ts.tokens.shape == (12, 1185) and ts.tokens.dtype == torch.int64
    assert ts.labels.shape == (12,)
    assert ts.tokenizer.n_codes == 64 and ts.image_shape == (28, 28) and ts.spec == SirenSpec()
    assert summary["psnr_against"] == "images" and summary["bits_per_field"] == 1185 * 6
    assert math.isfinite(summary["detok_psnr"]) and 5 < summary["detok_psnr"] <= summary["fields_psnr"] + 1
    assert ts.meta["detok_psnr"] == summary["detok_psnr"] and ts.meta["n_classes"] == 10
    # the stored tokenizer decodes exactly what the fitted one did
    torch.testing.assert_close(ts.tokenizer.decode(ts.tokens), ts.tokenizer.decode(ts.tokenizer.encode(
        ts.tokenizer.decode(ts.tokens))), rtol=0, atol=0)


def test_centering_raises_detok_psnr_on_real_fields(mnist_fields, tmp_path, data_root):
    psnr = {}
    for center in ("mean", "none"):
        cfg = TokenizerConfig(codebook_size=64, iters=8, center=center, quiet=True)
        psnr[center] = run_tokenize(mnist_fields, tmp_path / f"{center}.safetensors", cfg, data_root=data_root,
                                    device="cpu", quiet=True)["detok_psnr"]
    assert psnr["mean"] > psnr["none"] + 5, psnr


def test_tokens_file_without_a_center_loads_as_raw_weights(tmp_path):
    from nfgen.io import load_artifact

    w = _weights()
    tok = WeightTokenizer.fit(w, SPEC, TokenizerConfig(codebook_size=16, iters=4, center="none"))
    ts = TokenSet(tok.encode(w), torch.zeros(6, dtype=torch.long), tok, SPEC, (4, 4))
    path = save_tokens(tmp_path / "t.safetensors", ts)
    tensors, meta = load_artifact(path, "tokens")
    del tensors["center"], meta["tokenizer"]["center"]  # what a tokens file written before centring holds
    old = tmp_path / "old.safetensors"
    save_artifact(old, "tokens", tensors, meta)
    loaded = load_tokens(old)
    assert loaded.tokenizer.cfg.center == "none"
    torch.testing.assert_close(loaded.tokenizer.decode(loaded.tokens), tok.decode(ts.tokens), rtol=0, atol=0)
    meta["tokenizer"]["center"] = "mean"  # claims a centre it does not hold
    save_artifact(old, "tokens", tensors, meta)
    with pytest.raises(NfgenError, match="invalid tokenizer"):
        load_tokens(old)


def test_run_tokenize_bad_files(mnist_fields, tmp_path):
    from nfgen.fields import load_fields

    cfg = TokenizerConfig(codebook_size=16, iters=2, quiet=True)
    with pytest.raises(NfgenError, match="expected a 'tokens'"):
        load_tokens(mnist_fields)  # a fields file is not a tokens file
    with pytest.raises(NfgenError, match="not found"):
        run_tokenize(tmp_path / "missing.safetensors", tmp_path / "t.safetensors", cfg, device="cpu")
    with pytest.raises(NfgenError, match="does not divide"):
        run_tokenize(mnist_fields, tmp_path / "t.safetensors", TokenizerConfig(group=2, quiet=True), device="cpu")
    fields = load_fields(mnist_fields)
    w = fields.weights.clone()
    w[0, 0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    save_artifact(nan_path, "fields", {"weights": w, "labels": fields.labels, "psnr": fields.psnr}, fields.meta)
    with pytest.raises(NfgenError, match="NaN"):
        run_tokenize(nan_path, tmp_path / "t.safetensors", cfg, device="cpu")
    assert not (tmp_path / "t.safetensors").exists()  # nothing written on bad input
