"""Reference generators that need no training: what a generative model of fields has to beat.

`gaussian_samples` draws from a Gaussian per class (its sample mean and covariance) over any vectors: fitted
weights (rendered afterwards) or pixels. A weight-space GPT that scores no better than the weight-space
Gaussian has learned little beyond the weights' means and correlations; the pixel-space Gaussian is the
same trivial model where no field stands between it and the image.

`token_marginals` / `marginal_token_samples` are the GPT with its context taken away: every token of a field
drawn on its own from how often each code occurs at that position in the class's training sequences. What a
GPT scores above this baseline is what it learned of how a field's tokens depend on each other.

`smoothed_bootstrap` / `bootstrap_token_weights` are the other end: a kernel density estimate that keeps every
dependency the training fields have, by copying a random training field of the class and jittering its drawn
components. It scores what near-copies of the training data score; the memorised fraction says how near.

Both token baselines treat a mode (a tokenizer with --modes) as part of the class: a sample's mode is drawn from
its class's training frequencies first, then everything else as for a class of that mode's fields.

`nfgen baseline` (`run_baseline`) samples the weight-space Gaussian of a run's fitted fields (with `--kind
marginals` or `bootstrap`, its tokens position by position or its fields jittered) into a samples file laid out like `nfgen generate`'s, so `nfgen
evaluate` scores it with the same metrics:

    nfgen baseline --run R --per-class 200                       # R/baseline/samples.safetensors, samples.png
    nfgen evaluate --run R/baseline --classifier R/classifier.safetensors
    nfgen baseline --run R --per-class 200 --kind marginals --weights expected --expected-from 32 --out R/marginals
    nfgen baseline --run R --per-class 200 --kind bootstrap --bandwidth 0.5 --out R/bootstrap
"""
from __future__ import annotations

import math
import time

import torch

from nfgen.common import make_generator
from nfgen.io import NfgenError


def gaussian_samples(x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """One draw per entry of `classes` [M] from the Gaussian of the rows of x [N, D] with that label → [M, D].

    Class c's Gaussian has the sample mean and covariance (ddof 1) of the rows with labels == c; class -1
    (unconditional) uses every row. A draw is mean + zᵀ(x_c − mean) / √(n_c − 1) with z ~ N(0, I_{n_c}):
    the exact covariance without forming the D×D matrix. Classes are drawn in ascending order, each as one
    block of normals from `generator`, so the result depends only on the inputs and the generator's state.
    Computed in float64, returned in x's dtype.
    """
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise NfgenError(f"gaussian_samples wants x [N, D] and labels [N], got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    labels, classes = labels.cpu(), classes.cpu()
    out = torch.empty(len(classes), x.shape[1], dtype=torch.float64)
    for c in classes.unique().tolist():  # sorted
        rows = x if c == -1 else x[labels == c]
        if rows.shape[0] < 2:
            raise NfgenError(f"class {c} has {rows.shape[0]} example(s); a Gaussian needs at least 2: use a larger "
                             f"training split")
        rows = rows.double().cpu()
        mean = rows.mean(0)
        want = classes == c
        z = torch.randn(int(want.sum()), rows.shape[0], generator=generator, dtype=torch.float64)
        out[want] = mean + z @ (rows - mean) / math.sqrt(rows.shape[0] - 1)
    return out.to(x.dtype)


KINDS = ("gaussian", "marginals", "bootstrap")
MODE_DRAW_SEED_OFFSET = 0x5EED_30DE  # the token baselines' mode draws: a stream of their own beside the tokens'


def run_baseline(fields_path, out_dir, *, per_class: int = 10, unconditional: int = 0, seed: int = 0,
                 kind: str = "gaussian", tokens_path=None, weights: str = "sampled", expected_from: int = 0,
                 bandwidth: float | None = None) -> dict:
    """Sample a reference generator without a GPT → OUT/samples.safetensors and OUT/samples.png: kind "gaussian"
    the per-class Gaussian over a fields file's weights; over a tokens file, "marginals" its tokens drawn position
    by position and "bootstrap" its fields copied and jittered by `bandwidth` class stds (default 0.5; both decoded
    with `weights` / `expected_from` as `nfgen generate` decodes)."""
    from nfgen.fields import training_split
    from nfgen.generate import SampleConfig, check_expected_from, check_sample_counts, classes_to_sample, save_samples

    if kind not in KINDS:
        raise NfgenError(f"--kind {kind!r} is not a baseline; use one of {', '.join(KINDS)}")
    if kind == "gaussian" and (weights != "sampled" or expected_from):
        raise NfgenError("--weights / --expected-from choose how token draws decode; they need --kind marginals "
                         "or bootstrap")
    if bandwidth is not None and kind != "bootstrap":
        raise NfgenError("--bandwidth is the bootstrap's jitter; it needs --kind bootstrap")
    if bandwidth is not None and not bandwidth >= 0:
        raise NfgenError(f"--bandwidth must be ≥ 0 (in class stds), got {bandwidth}")
    SampleConfig(weights=weights, expected_from=expected_from).validate()
    check_sample_counts(per_class, unconditional)  # before loading anything
    if kind != "gaussian":
        from nfgen.tokenizer import load_tokens

        data = load_tokens(tokens_path)
        labels, spec, image_shape, source = data.labels, data.spec, data.image_shape, {"tokens": str(tokens_path)}
        check_expected_from(expected_from, data.tokenizer)
    else:
        from nfgen.fields import load_fields

        data = load_fields(fields_path)
        if data.meta.get("generated"):
            raise NfgenError(f"{fields_path} holds generated fields; pass the fitted training fields (`nfgen fit`'s "
                             f"fields.safetensors)")
        labels, spec, image_shape, source = data.labels, data.spec, data.image_shape, {"fields": str(fields_path)}
    if (labels < 0).any():
        raise NfgenError(f"{fields_path if kind == 'gaussian' else tokens_path} holds unlabelled fields; a per-class "
                         f"baseline needs the labelled training fields")
    n_classes = int(labels.max()) + 1
    classes = classes_to_sample(n_classes, per_class, unconditional)
    t0 = time.perf_counter()
    if kind == "marginals":
        out = marginal_token_weights(data.tokenizer, data.tokens, labels, classes, seed, weights, expected_from)
        about = {"baseline": "each token drawn from its position's frequencies in the class", "weights": weights,
                 "expected_from": expected_from}
    elif kind == "bootstrap":
        bandwidth = 0.5 if bandwidth is None else bandwidth
        out = bootstrap_token_weights(data.tokenizer, data.tokens, labels, classes, seed, bandwidth, weights,
                                      expected_from)
        about = {"baseline": "a training field of the class with its drawn components jittered", "weights": weights,
                 "expected_from": expected_from, "bandwidth": bandwidth}
    else:
        out = gaussian_samples(data.weights, labels, classes, make_generator(seed))
        about = {"baseline": "per-class Gaussian over the weights"}
    seconds = time.perf_counter() - t0
    samples, png = save_samples(out_dir, out, classes, spec, image_shape, n_classes,
                                {**about, **source, "seed": seed, "training_split": training_split(data.meta)})
    return {"kind": kind, "n_fields": len(classes), "samples": str(samples), "png": str(png),
            "training_fields": len(labels), "seconds": round(seconds, 3)}


def token_marginals(tokens: torch.Tensor, labels: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Per-class, per-position code frequencies of token sequences [N, L] with labels [N] → float64
    [n_classes + 1, L, n_codes]; entry c holds class c's (n_classes = labels.max() + 1), the last every
    sequence's (class -1, unconditional). Each [c, l] row sums to 1; a class without sequences is refused."""
    if tokens.dim() != 2 or labels.shape != (tokens.shape[0],):
        raise NfgenError(f"token_marginals wants tokens [N, L] and labels [N], got {tuple(tokens.shape)} and "
                         f"{tuple(labels.shape)}")
    tokens, labels = tokens.long().cpu(), labels.long().cpu()
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= n_codes):
        raise NfgenError(f"tokens must be code ids in [0, {n_codes}), got {tokens.min()}..{tokens.max()}; "
                         f"pass the tokens file's codes, not model sequences")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = torch.zeros(n_classes + 1, tokens.shape[1], n_codes, dtype=torch.float64)
    ones = torch.ones(tokens.shape[1], 1, dtype=torch.float64).expand(-1, tokens.shape[0])
    for c in range(n_classes + 1):
        rows = tokens if c == n_classes else tokens[labels == c]
        if rows.shape[0] == 0:
            raise NfgenError(f"class {c} has no training sequences; its token frequencies are undefined: use a "
                             f"training split with every class")
        counts[c].scatter_add_(1, rows.T.contiguous(), ones[:, :rows.shape[0]])
    return counts / counts.sum(-1, keepdim=True)


def marginal_token_samples(freqs: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token sequence per entry of `classes` [M] (-1: unconditional), every position drawn independently
    from `freqs` ([n_classes + 1, L, n_codes], as `token_marginals` returns) → int64 [M, L]. Inverse-CDF draws
    from one block of uniforms per class, classes in ascending order, so the result depends only on the inputs
    and the generator's state."""
    n_classes = freqs.shape[0] - 1
    classes = torch.as_tensor(classes, dtype=torch.long).cpu()
    if classes.numel() and (classes.min() < -1 or classes.max() >= n_classes):
        raise NfgenError(f"class ids must be in [-1, {n_classes}), got {classes.min()}..{classes.max()}")
    cdf = freqs.cumsum(-1)
    cdf[..., -1] = 1.0  # rounding must not leave a uniform above the last bin
    out = torch.empty(len(classes), freqs.shape[1], dtype=torch.long)
    for c in classes.unique().tolist():
        want = classes == c
        u = torch.rand(freqs.shape[1], int(want.sum()), generator=generator, dtype=torch.float64)
        # right=True: a code never seen (a zero-width bin, cdf equal to its left neighbour's) is never drawn
        out[want] = torch.searchsorted(cdf[c], u, right=True).clamp_max(freqs.shape[2] - 1).T
    return out


def marginal_token_weights(tokenizer, tokens: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, seed: int,
                           weights: str = "sampled", expected_from: int = 0) -> torch.Tensor:
    """The marginals baseline end to end: a field per entry of `classes` [M] from the training `tokens` [N, L] /
    `labels` [N] of `tokenizer`, decoded as `generate_weights` decodes a GPT's draws → float32 weights [M, P].

    Unconditional entries of a class-centred tokenizer get a class drawn as generate_weights draws it (same seed
    offset). weights "expected": every position from `expected_from` on takes its mean code value under the
    class's frequencies, as the GPT's draws take their expected value under its distribution."""
    from nfgen.generate import CLASS_DRAW_SEED_OFFSET

    classes = tokenizer.draw_classes(classes, make_generator(seed + CLASS_DRAW_SEED_OFFSET))
    train_groups, groups = modes_as_classes(tokenizer, tokens, labels, classes, seed)
    freqs = token_marginals(tokens, train_groups, tokenizer.n_codes)
    drawn = marginal_token_samples(freqs, groups, make_generator(seed))  # a group's mode token is its only one
    if weights != "expected":
        return tokenizer.decode(drawn, classes).float()
    codes = tokenizer.code_vectors().double()
    vectors = (freqs @ codes)[groups]  # each position's mean code value; class -1 indexes the pooled entry
    keep = tokenizer.token_position(expected_from)  # a mode token keeps its draw
    vectors[:, :keep] = codes[drawn[:, :keep]]
    return tokenizer.decode_vectors(vectors.float(), classes, tokenizer.modes_of(drawn))


def modes_as_classes(tokenizer, tokens: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where sequences start with a mode token (--modes M): each sample's mode drawn from how often each mode
    occurs in its class's training `tokens` [N, L], and (class, mode) as one class from then on → (training
    groups labels · M + mode [N], sample groups classes · M + drawn mode [B]). Otherwise (labels, classes)."""
    if not tokenizer.lead:
        return labels, classes
    M, labels, classes = tokenizer.cfg.modes, labels.long().cpu(), classes.long().cpu()
    train_modes = tokens[:, 0].long().cpu()
    freq = torch.zeros(tokenizer.class_prior.shape[0], M, dtype=torch.float64)
    freq.index_put_((labels, train_modes), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    gen, modes = make_generator(seed + MODE_DRAW_SEED_OFFSET), torch.empty_like(classes)
    for c in classes.unique().tolist():
        want = classes == c
        if not float(freq[c].sum()) > 0:
            raise NfgenError(f"class {c} has no training fields to draw a mode from: use a training split with "
                             f"every class")
        modes[want] = torch.multinomial(freq[c], int(want.sum()), replacement=True, generator=gen)
    return labels * M + train_modes, classes * M + modes


def smoothed_bootstrap(x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, bandwidth: float,
                       generator: torch.Generator, spread: dict | None = None) -> torch.Tensor:
    """One draw per entry of `classes` [M] from a Gaussian kernel density estimate over the rows of x [N, D] with
    that label (-1: every row) → float64 [M, D]: a uniformly chosen row plus noise of `bandwidth` times the class's
    per-column std (ddof 1), or `spread[class]` [D] where given. Classes are drawn in ascending order, each from one
    block of `generator`."""
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise NfgenError(f"smoothed_bootstrap wants x [N, D] and labels [N], got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    if not bandwidth >= 0:
        raise NfgenError(f"the bootstrap's bandwidth must be ≥ 0 (in class stds), got {bandwidth}")
    labels, classes = labels.cpu(), torch.as_tensor(classes, dtype=torch.long).cpu()
    out = torch.empty(len(classes), x.shape[1], dtype=torch.float64)
    for c in classes.unique().tolist():
        rows = (x if c == -1 else x[labels == c]).double().cpu()
        given = None if spread is None else spread.get(c)
        if rows.shape[0] < (1 if given is not None else 2):
            raise NfgenError(f"class {c} has {rows.shape[0]} example(s); a bootstrap's spread needs at least 2: use "
                             f"a larger training split")
        want = classes == c
        pick = torch.randint(0, rows.shape[0], (int(want.sum()),), generator=generator)
        noise = torch.randn(int(want.sum()), x.shape[1], generator=generator, dtype=torch.float64)
        out[want] = rows[pick] + bandwidth * (rows.std(0) if given is None else given.double()) * noise
    return out


def bootstrap_token_weights(tokenizer, tokens: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, seed: int,
                            bandwidth: float = 0.5, weights: str = "sampled", expected_from: int = 0) -> torch.Tensor:
    """The smoothed bootstrap over a tokens file's code vectors, laid out like `marginal_token_weights`: the
    positions a GPT's draw keeps (all of them; with weights "expected", those before `expected_from`) are a random
    training field of the class jittered by `bandwidth` class stds, the rest its class's mean code vector (where
    the marginals and the GPT take their expected values) → float32 weights [M, P]."""
    from nfgen.generate import CLASS_DRAW_SEED_OFFSET

    classes = tokenizer.draw_classes(classes, make_generator(seed + CLASS_DRAW_SEED_OFFSET))
    labels = labels.long().cpu()
    missing = sorted(set(classes.tolist()) - set(labels.tolist()) - {-1})
    if missing:
        raise NfgenError(f"class {missing[0]} has no training fields to copy: use a training split with every class")
    train_groups, groups = modes_as_classes(tokenizer, tokens, labels, classes, seed)
    codes = tokenizer.code_vectors().double()
    vectors = codes[tokens.long().cpu()]  # [N, L, group]
    # the class's mean code vectors, as the marginals baseline takes them; class -1 indexes the pooled entry
    out = (token_marginals(tokens, train_groups, tokenizer.n_codes) @ codes)[groups]
    drawn = tokenizer.token_position(expected_from) if weights == "expected" else vectors.shape[1]
    if drawn:
        flat = vectors[:, :drawn].flatten(1)
        spread = None
        if tokenizer.lead:  # a mode of one field has no spread of its own: it is jittered by its class's
            M, sizes = tokenizer.cfg.modes, torch.bincount(train_groups)
            spread = {g: flat[labels == g // M].std(0) for g in groups.unique().tolist() if sizes[g] < 2}
        jittered = smoothed_bootstrap(flat, train_groups, groups, bandwidth, make_generator(seed), spread)
        out[:, :drawn] = jittered.view(len(classes), drawn, -1)
    modes = None if not tokenizer.lead else groups % tokenizer.cfg.modes
    return tokenizer.decode_vectors(out.float(), classes, modes)
