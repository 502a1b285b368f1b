"""The tokenize stage: learn VQ codebooks over SIREN weights, turn every field into L code tokens.

A field's flat weights [P] are (optionally) centred on the dataset's mean field (each weight minus its mean
over the training fields) and (optionally) divided by a per-tensor scale, cut into P/group vectors of `group` consecutive
weights, and each vector is quantised by `levels` residual codebooks of `codebook_size` codes: level j
quantises what levels < j left over. Token ids: level j uses j*K … (j+1)*K-1, and a vector's r tokens are
consecutive, so a field is L = (P / group) * levels tokens in [0, levels * K). The sequence framing (SOS,
class) is nfgen.vocab's.

Centring (--center mean) keeps almost all of a field through scalar VQ. Fields fitted from a shared template
have raw weights spread over the template's whole init range (rms 0.08), but they differ from their mean by
only 0.014-0.016 rms, so codes spent on the raw range resolve the part that differs between fields coarsely.
Measured on 1000 MNIST fields (K = 256, `python -m benchmarks.tokenize_quality`, results in
benchmarks/results/tokenize-quality-cpu.json), de-tokenized PSNR rises from 33.1 to 37.6 dB (fit 100 steps
at lr 1e-3; fitted 37.7 dB) and from 34.0 to 50.4 dB (fit 200 steps at 1.5e-3; fitted 56.9 dB).
It is not the default because a GPT models the raw codes better. At the demo's size (same fields and GPT,
`python -m benchmarks.demo_tokenizers`, benchmarks/results/demo-tokenizers-cpu.json), classifier accuracy
of the samples is 0.535 with raw codes, 0.10 with centred codes (K = 256) and 0.165 with centred codes
(K = 64, whose per-position entropy matches the raw codes'). The full-size GPU run measures it again
(the quality ablation rows vq:center-mean).

Principal components (--basis pca) are the third option: token i quantises the field's i-th principal
component over the training fields (largest first, divided by its std), so a field is described coarse to
fine and any sampled token moves it along a direction that real fields vary in. It keeps nearly all of a
field (42.07 of the fitted 42.21 dB on the CPU quality run's 4000 fields, against 36.9 dB for raw codes),
and its samples cover the data as raw codes' do not (at T 1: COV 0.495 against 0.395, 1-NNA 0.83 against
0.985). But the small GPT's samples ignore their class (accuracy 0.14 against 0.26, both at T 1); our reading
is that the class shifts mostly the first few components, where it shifts every raw weight (docs/quality.md;
benchmarks/results/quality-cpu-small-roles-pca.json). Hence an option, with the quality ablation rows vq:pca*.

The class's mean field (--center class) can be taken out too: class c's fields are quantised relative to their
mean, decoding adds it back, so tokens decode only with their class (the sequence's CLASS token), and an
unconditional sample draws its class from the training frequencies first. With --basis class-pca the tokens are
then each class's own principal components of those offsets, in units of their std (each class's covariance
mixed with --shrinkage of the pooled one, so held-out fields outside the span of a class's few fields still
encode). A token sequence of standard normal components then decodes to a draw from the class's Gaussian
whatever the GPT has learned of the class, which the small GPT had not: on the CPU quality run it lifts the
samples' accuracy from 0.47 (raw codes) to 0.90 and coverage from 0.15 to 0.48, level with the per-class
Gaussian, and keeps 42.06 of 42.21 dB (held-out fields 38.04 of 41.22; docs/quality.md;
benchmarks/results/quality-cpu-small-class-pca.json). The pooled basis (--basis pca --center class) and class
centring of raw codes (--center class) score below it (quality-cpu-small-class-centred.json). It is the small
quality config's main recipe; the tokenize default stays the raw codes until the H100 rows (vq:class-pca) say
whether the 11 M GPT, whose raw-code samples beat the weight-space Gaussian on MMD but not on coverage, gains
from it too.

A class is rarely one Gaussian: MNIST 7s come with and without a bar, 1s upright and slanted. --modes M splits
each class's fields into M modes by k-means in weight space, and each mode gets its own mean field (and, with
class-pca, its own basis); a field's mode (the nearest mode mean of its class) is its sequence's first token, so
the GPT draws the mode first and the components in that mode's basis after it. Without a GPT, standard normal
components through each mode's basis (the mode drawn from its class's training frequencies; `python -m
benchmarks.class_pca_shrinkage --modes 1,2,4,8,16 --draws 10`, benchmarks/results/class-pca-modes-cpu.json)
score higher accuracy and lower MMD than through one basis per class. With the small GPT on the CPU quality run's
8000 fields, accuracy rises from 0.955 to 0.972 with 4 modes and 0.983 with 8, and MMD falls from 0.236 to 0.224 /
0.227, 1-NNA within its seed spread (3 seeds; benchmarks/results/quality-cpu-small-8000-modes{4,8}.json), so the
quality configs tokenize with 8. The default stays 1 with the rest of the class-pca recipe (the tokenize defaults
are raw weight codes).

Coarse tokens (--coarse K, with --basis pca or class-pca) put before each of the first K components' code a token
naming which of --coarse-levels equal-probability bins of a standard normal its coded value falls in. They add no
information (decoding reads the codes; bits_per_field does not count them) but split a leading component's draw
in two, its bin first. That matters under top-k sampling: over 256 fine codes, top-k 3 keeps three neighbouring
codes at a component's mode and pins the leading components, where over bins it keeps three bins that span the
component's spread. NeF-GPT's protocol samples at top-k 3. On the CPU quality run 32 components with 8 bins lifted
its COV at top-k 3 / T 0.8 from 0.265 to 0.430, while the main protocol's accuracy (T 1) fell from 0.983 to 0.948,
below three trainings of the plain recipe (0.978-0.983); so off by default (docs/quality.md, "Coarse tokens").

Per-tensor normalisation (--normalize layer) is an option: the first layer's weights are ~30x larger
than the later layers', so a shared codebook spends most codes on layer 0. Measured, that is the right
call: layer 0 feeds sin(omega0 * .), so its errors cost the most PSNR; hence the default "none".
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nfgen.common import pick_device, progress
from nfgen.io import NfgenError, check_finite, load_artifact, save_artifact
from nfkernels import SirenSpec
from nfkernels.vq import MAX_DIM, kmeans, vq_assign

TOKENIZE_HINT = "run `nfgen tokenize` first"
NORMALIZE = ("layer", "none")
CENTER = ("mean", "class", "none")
BASIS = ("weights", "pca", "class-pca")
# "pca": principal directions with a std below this fraction of the first's (none when there are fewer fields
# than weights) keep this std, so encoding a new field cannot divide by zero
PCA_MIN_STD = 1e-4
ENCODE_CHUNK = 1 << 22  # vectors per vq_assign call: bounds the temporaries, not the result


@dataclass
class TokenizerConfig:
    codebook_size: int = 256  # K codes per level
    group: int = 1  # weights per vector (1 = scalar VQ)
    levels: int = 1  # residual VQ levels
    # "layer": divide each weight tensor by its std over the dataset; "none": raw weights. Measured on 256
    # MNIST fields without centring (300 fit steps, K=256): de-tokenized PSNR none 31.8 dB vs layer 30.7 dB
    # (group 3: 14.1 vs 11.9), so "none" is the default: layer 0 is pre-multiplied by omega0, its errors cost
    # the most.
    normalize: str = "none"
    # "mean": quantise each weight's offset from its mean over the fields; "class": from its mean over the fields
    # of the field's class (tokens then decode only together with their class; unconditional samples draw a class
    # from the training frequencies first); "none": raw
    center: str = "none"
    # "weights": token i quantises weight i (in the spec's flattening order); "pca": token i quantises the
    # field's i-th principal component over the training fields (largest variance first), in units of its std,
    # so the sequence runs coarse to fine and a sampled token moves a field along a direction real fields vary
    # in. "pca" does its own centring and scaling (--normalize none; --center none, or class: the principal
    # components of the fields' offsets from their class means, pooled over the classes). "class-pca" (with
    # --center class): each class's own principal components of its offsets, in units of their std, so that
    # standard components decode to that class's spread
    basis: str = "weights"
    # "class-pca": each class's covariance mixed with this share of the pooled within-class one before its principal
    # directions are taken. A class's few fields (400 for 1185 weights on the CPU quality run) span only part of
    # the space, and a held-out field outside it does not encode: held-out fields de-tokenize at 23.1 dB unmixed,
    # 33.2 at 0.05, 38.0 at 0.2, 40.4 at 0.5 and 41.0 at 1 (fitted 41.2). Standard normal components decoded
    # through each class's basis keep the class up to 0.2 (accuracy 0.92, 0.915, 0.91) and lose it beyond (0.805
    # at 0.5, 0.58 at 1); `python -m benchmarks.class_pca_shrinkage`, benchmarks/results/class-pca-shrinkage-cpu.json
    shrinkage: float = 0.2
    # center "class": split each class's fields into this many modes by k-means in weight space, and quantise
    # each field around its mode's mean field (with "class-pca": in its mode's own basis). The mode is then the
    # sequence's first token (an id in [0, modes)), so the GPT draws it first: where standard normal class-pca
    # components are one Gaussian per class, they become a mixture of `modes` Gaussians. 1 keeps the tokens of
    # before the option existed; the quality configs use 8 (module docstring)
    modes: int = 1
    # basis "pca" / "class-pca": the first `coarse` components each get a coarse token before their code token: which
    # of `coarse_levels` equal-probability bins of a standard normal the coded value falls in (an id in [0,
    # coarse_levels)). It adds nothing to the field (decoding reads the code; bits_per_field does not count it) but
    # splits a leading component's draw in two, its bin first. Top-k sampling then truncates among bins that span
    # the component's spread, where over 256 fine codes its top 3 are three neighbours at the component's mode
    # (NeF-GPT's protocol samples at top-k 3; module docstring)
    coarse: int = 0
    coarse_levels: int = 8
    iters: int = 30  # Lloyd iterations per level
    sample: int = 1_000_000  # vectors k-means learns from (0 = all)
    seed: int = 0
    backend: str = "auto"  # vq_assign backend: auto, torch, cpp, triton
    quiet: bool = False

    def validate(self, num_params: int | None = None) -> None:
        if self.codebook_size < 2:
            raise NfgenError(f"codebook size {self.codebook_size} is too small; use --codebook-size 2 or more")
        if self.levels < 1:
            raise NfgenError(f"--levels {self.levels} is invalid; use 1 or more")
        if not 1 <= self.group <= MAX_DIM:
            raise NfgenError(f"--group {self.group} is invalid; use a group size between 1 and {MAX_DIM}")
        if self.normalize not in NORMALIZE:
            raise NfgenError(f"unknown normalisation {self.normalize!r}; use --normalize layer or none")
        if self.center not in CENTER:
            raise NfgenError(f"unknown centring {self.center!r}; use --center mean, class or none")
        if self.basis not in BASIS:
            raise NfgenError(f"unknown basis {self.basis!r}; use --basis weights, pca or class-pca")
        if self.basis == "pca" and (self.center == "mean" or self.normalize != "none"):
            raise NfgenError("--basis pca centres and scales the principal components itself; "
                             "use --center none or class and --normalize none")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise NfgenError(f"--shrinkage {self.shrinkage} is invalid; use a share between 0 and 1")
        if self.basis == "class-pca" and (self.center != "class" or self.normalize != "none"):
            raise NfgenError("--basis class-pca takes each class's principal components around its class's mean "
                             "field; use it with --center class and --normalize none")
        if self.modes < 1:
            raise NfgenError(f"--modes {self.modes} is invalid; use 1 or more")
        if self.modes > 1 and self.center != "class":
            raise NfgenError("--modes splits each class into modes around their own mean fields; use it with "
                             "--center class")
        if self.modes > self.codebook_size:
            raise NfgenError(f"--modes {self.modes} exceeds --codebook-size {self.codebook_size} (the mode is a "
                             f"code token); use at most {self.codebook_size} modes")
        if self.coarse < 0:
            raise NfgenError(f"--coarse {self.coarse} is invalid; use 0 (none) or a count of leading components")
        if self.coarse and (self.basis == "weights" or self.group != 1 or self.levels != 1):
            raise NfgenError("--coarse bins standardised components, one token each; use it with --basis pca or "
                             "class-pca, --group 1 and --levels 1")
        if self.coarse and not 2 <= self.coarse_levels <= self.codebook_size:
            raise NfgenError(f"--coarse-levels {self.coarse_levels} is invalid; use 2 to --codebook-size "
                             f"({self.codebook_size}) bins (a coarse token is a code id)")
        if num_params is not None and self.coarse > num_params:
            raise NfgenError(f"--coarse {self.coarse} exceeds the {num_params} components of a field; use at most "
                             f"{num_params}")
        if self.iters < 0 or self.sample < 0:
            raise NfgenError("--iters and --sample must be ≥ 0")
        if self.backend not in ("auto", "torch", "cpp", "cuda", "triton"):
            raise NfgenError(f"unknown backend {self.backend!r}; use auto, torch, cpp or triton")
        if num_params is not None and num_params % self.group:
            valid = [g for g in range(1, MAX_DIM + 1) if num_params % g == 0]
            raise NfgenError(f"--group {self.group} does not divide the {num_params} weights of a field; "
                             f"use one of {valid}")


class WeightTokenizer:
    """Centre [P] (+ class means [C, P] and the training class frequencies [C], with center "class") + per-tensor
    scales [T] (+ basis [P, P] and its stds [P] with basis "pca", a basis [C, P, P] and stds [C, P] per class with
    "class-pca") + codebooks [levels, K, group]; maps weights [N, P] ↔ tokens [N, L] (with center "class",
    together with the fields' classes [N]).

    With M = cfg.modes > 1 every class is M modes: the class means become the modes' means [C·M, P] (class c's
    mode m at row c·M + m), class-pca takes a basis per mode, and a sequence starts with its mode token."""

    def __init__(self, spec: SirenSpec, cfg: TokenizerConfig, codebooks: torch.Tensor, scales: torch.Tensor,
                 center: torch.Tensor | None = None, basis: torch.Tensor | None = None,
                 basis_stds: torch.Tensor | None = None, class_centers: torch.Tensor | None = None,
                 class_prior: torch.Tensor | None = None):
        cfg.validate(spec.num_params)
        n_tensors, P = len(spec.param_layout()), spec.num_params
        center = torch.zeros(P) if center is None else center
        pca, by_class = cfg.basis != "weights", cfg.center == "class"
        per_group = (class_centers.shape[0],) if cfg.basis == "class-pca" and class_centers is not None else ()
        if (codebooks.shape != (cfg.levels, cfg.codebook_size, cfg.group) or scales.shape != (n_tensors,)
                or center.shape != (P,) or pca != (basis is not None) or pca != (basis_stds is not None)
                or (pca and (basis.shape != (*per_group, P, P) or basis_stds.shape != (*per_group, P)
                             or not bool((basis_stds > 0).all())))
                or by_class != (class_centers is not None) or by_class != (class_prior is not None)
                or (by_class and (class_centers.dim() != 2 or class_centers.shape[1] != P
                                  or class_prior.dim() != 1
                                  or class_centers.shape[0] != cfg.modes * class_prior.shape[0]
                                  or not bool((class_prior >= 0).all())
                                  or not float(class_prior.sum()) > 0))):
            raise NfgenError(f"tokenizer tensors do not match its config (codebooks {tuple(codebooks.shape)}, "
                             f"scales {tuple(scales.shape)}, center {tuple(center.shape)}, basis "
                             f"{None if basis is None else tuple(basis.shape)}, class centers "
                             f"{None if class_centers is None else tuple(class_centers.shape)}); "
                             f"recreate the tokens file")
        self.spec, self.cfg = spec, cfg
        self.codebooks = codebooks.float()
        self.scales = scales.float()
        self.center = center.float()
        # columns: orthonormal principal directions; a field is center + basis @ (basis_stds * components) (with
        # "class-pca", its class's basis[c] and basis_stds[c])
        self.basis = None if basis is None else basis.float()
        self.basis_stds = None if basis_stds is None else basis_stds.float()
        # center "class": class c's fields are quantised relative to center + class_centers[c]; class_prior is how
        # often each class occurs among the training fields, what an unconditional sample draws its class from
        self.class_centers = None if class_centers is None else class_centers.float()
        self.class_prior = None if class_prior is None else (class_prior / class_prior.sum()).float()
        # tokens before the components: the mode token, with cfg.modes > 1
        self.lead = int(cfg.modes > 1)

    @property
    def needs_classes(self) -> bool:
        """Whether encoding and decoding need each field's class (center "class")."""
        return self.class_centers is not None

    def _offsets(self, groups: torch.Tensor | None, device) -> torch.Tensor:
        """What each field is quantised relative to: the centre [P], plus (center "class") the mean field of its
        class, or of its mode (`groups` [n], from _groups) → [n, P]."""
        center = self.center.to(device)
        return center if groups is None else center + self.class_centers.to(device)[groups.to(device)]

    def _groups(self, labels, modes, n: int) -> torch.Tensor | None:
        """Each field's row of class_centers (and of a class-pca basis): its class, or class · M + mode with M =
        cfg.modes > 1 (NfgenError for missing or out-of-range ids); None without center "class"."""
        labels = self._checked_labels(labels, n)
        if labels is None or not self.lead:
            return labels
        if modes is None:
            raise NfgenError(f"these tokens start with a mode token (--modes {self.cfg.modes}): decoding needs each "
                             f"field's mode; pass tokens[:, 0] (WeightTokenizer.modes_of)")
        modes = torch.as_tensor(modes).long().to(labels.device)
        if modes.shape != (n,) or (n and (int(modes.min()) < 0 or int(modes.max()) >= self.cfg.modes)):
            raise NfgenError(f"modes must be [{n}] ids in [0, {self.cfg.modes}); sample the first token of a "
                             f"sequence among the modes")
        return labels * self.cfg.modes + modes

    def modes_of(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The mode of each sequence of tokens [N, L] (its first token), or None where there are no modes."""
        return tokens[:, 0].long() if self.lead else None

    def assign_modes(self, weights: torch.Tensor, labels) -> torch.Tensor | None:
        """Each field's mode [N] (None without modes): the nearest, in weight space, of its class's mode means."""
        if not self.lead:
            return None
        self._check_weights(weights)
        labels = self._checked_labels(labels, weights.shape[0])
        M, labels = self.cfg.modes, labels.to(weights.device)
        means = self.class_centers.to(weights.device).view(-1, M, weights.shape[1])
        out = torch.empty(weights.shape[0], dtype=torch.int64, device=weights.device)
        for c in labels.unique().tolist():
            rows = labels == c
            out[rows] = torch.cdist(weights[rows].float(), means[c]).argmin(1)
        return out

    def _checked_labels(self, labels, n: int) -> torch.Tensor | None:
        """labels as int64 [n] in [0, C) where the tokens need classes (NfgenError otherwise); else None."""
        if not self.needs_classes:
            return None
        n_classes = self.class_prior.shape[0]
        if labels is None:
            raise NfgenError("these tokens are offsets from their class's mean field (--center class): encoding and "
                             "decoding need every field's class; pass the labels")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise NfgenError(f"labels {tuple(labels.shape)} do not match the {n} fields; pass one class per field")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise NfgenError(f"class ids must be in [0, {n_classes}) for tokens centred on their class "
                             f"(--center class), got {int(labels.min())}..{int(labels.max())}; label every field "
                             f"(unconditional samples draw their class first: draw_classes)")
        return labels

    def draw_classes(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """classes [B] with every -1 (unconditional) replaced by a class drawn from the training frequencies (center
        "class", whose fields decode only with a class); otherwise classes unchanged."""
        classes = torch.as_tensor(classes, dtype=torch.long).cpu()
        unconditional = classes < 0
        if not self.needs_classes or not bool(unconditional.any()):
            return classes
        drawn = torch.multinomial(self.class_prior, int(unconditional.sum()), replacement=True, generator=generator)
        return classes.masked_scatter(unconditional, drawn)

    # ------------------------------------------------------------------ sizes
    @property
    def n_codes(self) -> int:
        return self.cfg.levels * self.cfg.codebook_size

    @property
    def n_components(self) -> int:
        """Code tokens per field (vectors × levels); the mode and coarse tokens come on top."""
        return self.spec.num_params // self.cfg.group * self.cfg.levels

    @property
    def tokens_per_field(self) -> int:
        return self.lead + self.cfg.coarse + self.n_components

    @property
    def bits_per_field(self) -> float:
        # a coarse token is a function of its code token: no bits of its own
        return self.n_components * math.log2(self.cfg.codebook_size) + self.lead * math.log2(self.cfg.modes)

    def token_position(self, component: int) -> int:
        """Where component `component`'s tokens start (its coarse token, if it has one); n_components: the end."""
        k = self.cfg.coarse
        return self.lead + 2 * min(component, k) + max(component - k, 0)

    def code_positions(self, device=None) -> torch.Tensor:
        """[n_components]: the positions of the code tokens, the ones decoding reads."""
        k = self.cfg.coarse
        return torch.cat([self.lead + 2 * torch.arange(k, device=device) + 1,
                          torch.arange(self.lead + 2 * k, self.tokens_per_field, device=device)])

    def coarse_edges(self, device=None) -> torch.Tensor:
        """[coarse_levels - 1]: the inner edges of the coarse bins, standard normal quantiles j / coarse_levels."""
        q = torch.arange(1, self.cfg.coarse_levels, dtype=torch.float64) / self.cfg.coarse_levels
        return torch.distributions.Normal(0.0, 1.0).icdf(q).float().to(device)

    def token_ranges(self) -> torch.Tensor:
        """[L, 2]: the allowed [lo, hi) token ids at each position (level j of a vector: j*K … (j+1)*K; a mode token:
        0 … modes; a coarse token: 0 … coarse_levels)."""
        K, k = self.cfg.codebook_size, self.cfg.coarse
        level = torch.arange(self.n_components) % self.cfg.levels
        ranges = torch.zeros(self.tokens_per_field, 2, dtype=torch.int64)
        ranges[self.code_positions()] = torch.stack([level * K, (level + 1) * K], dim=1)
        ranges[self.lead + 2 * torch.arange(k), 1] = self.cfg.coarse_levels
        ranges[:self.lead, 1] = self.cfg.modes
        return ranges

    @property
    def n_role_nodes(self) -> int:
        """Node ids that token_roles uses: every input, neuron and output, plus one for the biases' source."""
        spec = self.spec
        return spec.in_dim + spec.hidden * spec.hidden_layers + spec.out_dim + 1

    def token_roles(self) -> torch.Tensor:
        """[L, 2] int64: each token's place in the network, as the edge (source node, destination node) of its
        vector's first weight. Nodes are numbered layer by layer (input coordinates, each hidden layer's
        neurons, outputs); W_l[n, m] joins node m of boundary l to node n of boundary l + 1, and a bias's source
        is the extra node n_role_nodes - 1. So the weights into a neuron, its bias and the weights out of it
        all name that neuron's node."""
        if self.cfg.basis != "weights":
            raise NfgenError("weight roles need tokens that stand for weights, and these stand for principal "
                             "components (--basis pca); train without --weight-roles or tokenize with --basis weights")
        if self.lead:
            raise NfgenError("weight roles name the weight each token stands for, and a mode token (--modes) stands "
                             "for none; train without --weight-roles or tokenize with --modes 1")
        spec = self.spec
        widths = [spec.in_dim] + [spec.hidden] * spec.hidden_layers + [spec.out_dim]
        first = [sum(widths[:i]) for i in range(len(widths))]
        bias_node = self.n_role_nodes - 1
        edges = []
        for li, (fan_in, fan_out) in enumerate(spec.layer_dims):
            out_nodes = first[li + 1] + torch.arange(fan_out)
            edges.append(torch.stack([(first[li] + torch.arange(fan_in)).repeat(fan_out),
                                      out_nodes.repeat_interleave(fan_in)], dim=1))  # W_l, row-major [out, in]
            edges.append(torch.stack([torch.full((fan_out,), bias_node), out_nodes], dim=1))  # b_l
        per_weight = torch.cat(edges)
        return per_weight[::self.cfg.group].repeat_interleave(self.cfg.levels, dim=0)

    # ------------------------------------------------------------------ maths
    def scale_vector(self, device=None) -> torch.Tensor:
        """[P]: each weight's tensor scale, following the spec's flattening order."""
        counts = torch.tensor([t["numel"] for t in self.spec.param_layout()])
        return self.scales.repeat_interleave(counts).to(device)

    @staticmethod
    def mean_field(weights: torch.Tensor, center: str) -> torch.Tensor:
        """[P] on CPU: what every field is quantised relative to."""
        if center == "none":
            return torch.zeros(weights.shape[1])
        return weights.double().mean(dim=0).float().cpu()

    @staticmethod
    def class_means(weights: torch.Tensor, labels, n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's mean field [C, P] and its number of fields [C] (C = n_classes, at least max label + 1), on
        CPU. A class without fields gets the mean of all fields (and count 0, so unconditional samples never draw
        it); unlabelled fields are refused."""
        if labels is None:
            raise NfgenError("--center class needs the fields' classes; tokenize labelled fields")
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != weights.shape[:1] or not labels.numel() or int(labels.min()) < 0:
            raise NfgenError("--center class needs a class for every field, and some fields have none; "
                             "tokenize labelled fields or use --center mean or none")
        counts = torch.bincount(labels, minlength=n_classes or 0)
        w = weights.double().cpu()
        sums = torch.zeros(len(counts), w.shape[1], dtype=torch.float64).index_add_(0, labels, w)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], w.mean(0))
        return means.float(), counts

    @staticmethod
    def class_modes(weights: torch.Tensor, labels: torch.Tensor, class_centers: torch.Tensor, modes: int,
                    seed: int, max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """Split every class's fields into `modes` by k-means in weight space (k-means++ seeding, Lloyd until no
        field moves or `max_iters`) → the modes' mean fields [C·modes, P] (class c's mode m at row c·modes + m;
        a class without fields keeps its class centre in every mode) and each field's row [N], on CPU. A class
        with fewer fields than modes is refused."""
        w, labels = weights.double().cpu(), labels.cpu()
        gen = torch.Generator().manual_seed(seed)
        means = class_centers.double().repeat_interleave(modes, dim=0)
        groups = torch.empty_like(labels)
        check_mode_counts(labels, modes)
        for c in range(class_centers.shape[0]):
            idx = torch.nonzero(labels == c).flatten()
            if not len(idx):
                continue
            x = w[idx]
            centers = x[torch.randint(len(x), (1,), generator=gen)]
            for _ in range(modes - 1):  # k-means++: far from the chosen centres is likelier
                d2 = torch.cdist(x, centers).min(1).values.square()
                pick = torch.multinomial(d2 / d2.sum(), 1, generator=gen) if float(d2.sum()) > 0 else \
                    torch.randint(len(x), (1,), generator=gen)
                centers = torch.cat([centers, x[pick]])
            assign = None
            for _ in range(max_iters):
                dist = torch.cdist(x, centers)
                new = dist.argmin(1)
                for m in range(modes):  # an emptied mode restarts at the field farthest from its centre
                    if not bool((new == m).any()):
                        far = int(dist.min(1).values.argmax())
                        new[far] = m
                        dist[far] = 0.0
                if assign is not None and torch.equal(new, assign):
                    break
                assign = new
                centers = torch.zeros_like(centers).index_add_(0, assign, x) / \
                    torch.bincount(assign, minlength=modes).double()[:, None]
            means[c * modes:(c + 1) * modes] = centers
            groups[idx] = c * modes + assign
        return means.float(), groups

    @staticmethod
    def principal_basis(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean [P], principal directions [P, P] (columns, largest variance first) and their stds [P] of the
        fields [N, P], in float64 on CPU (P x P is small: 1185 for the default SIREN)."""
        w = weights.double().cpu()
        mean = w.mean(dim=0)
        return (mean.float(), *WeightTokenizer.principal_axes((w - mean).T @ (w - mean) / w.shape[0]))

    @staticmethod
    def principal_axes(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A covariance [P, P] → its eigenvectors [P, P] (columns, largest variance first) and stds [P], those
        below PCA_MIN_STD of the first raised to it."""
        variances, directions = torch.linalg.eigh(cov)  # ascending
        variances, directions = variances.flip(0).clamp_min(0), directions.flip(1)
        stds = variances.sqrt()
        stds = stds.clamp_min(PCA_MIN_STD * float(stds[0]) if float(stds[0]) > 0 else 1.0)
        return directions.float(), stds.float()

    @classmethod
    def class_principal_bases(cls, offsets: torch.Tensor, labels, n_classes: int, shrinkage: float):
        """Zero centre [P], and per class the principal directions [C, P, P] and stds [C, P] of its fields'
        offsets from their class mean [N, P]: of (1 - shrinkage) × the class's covariance + shrinkage × the pooled
        one (every class's offsets together). A class with fewer than 2 fields takes the pooled one alone."""
        o, labels = offsets.double().cpu(), torch.as_tensor(labels).long().cpu()
        pooled = o.T @ o / o.shape[0]  # the offsets have mean 0 within every class
        bases, stds = [], []
        for c in range(n_classes):
            rows = o[labels == c]
            cov = pooled if rows.shape[0] < 2 else (1 - shrinkage) * (rows.T @ rows / rows.shape[0]) + shrinkage * pooled
            basis, std = cls.principal_axes(cov)
            bases.append(basis)
            stds.append(std)
        return torch.zeros(offsets.shape[1]), torch.stack(bases), torch.stack(stds)

    @staticmethod
    def tensor_scales(weights: torch.Tensor, spec: SirenSpec, normalize: str) -> torch.Tensor:
        layout = spec.param_layout()
        if normalize == "none":
            return torch.ones(len(layout))
        stds = [weights[:, t["offset"]:t["offset"] + t["numel"]].double().std(unbiased=False) for t in layout]
        # a constant tensor (std 0, e.g. never trained) keeps scale 1 instead of dividing by zero
        return torch.tensor([float(s) if s > 0 else 1.0 for s in stds], dtype=torch.float32)

    def _check_weights(self, weights: torch.Tensor) -> None:
        if weights.dim() != 2 or weights.shape[1] != self.spec.num_params:
            raise NfgenError(f"weights {tuple(weights.shape)} do not match the tokenizer's architecture "
                             f"(P={self.spec.num_params}); tokenize fields of the same architecture")
        check_finite("weights", weights, "refit the fields (they diverged) before tokenizing")

    def _vectors(self, weights: torch.Tensor, labels=None, modes=None) -> torch.Tensor:
        self._check_weights(weights)
        groups = self._groups(labels, modes, weights.shape[0])
        w = self._rotate(weights.float() - self._offsets(groups, weights.device), groups, to_components=True)
        w = w / self.scale_vector(weights.device)
        return w.reshape(-1, self.cfg.group)

    @classmethod
    def fit(cls, weights: torch.Tensor, spec: SirenSpec, cfg: TokenizerConfig, *, labels=None,
            n_classes: int | None = None, callback=None) -> "WeightTokenizer":
        """Learn scales and `levels` residual codebooks from weights [N, P] (on weights' device); center "class"
        also needs the fields' classes, `labels` [N], and takes the number of classes (default max label + 1).

        `callback(level, iteration, mse)` is called after every k-means assignment.
        """
        cfg.validate(spec.num_params)
        if weights.dim() != 2 or weights.shape[1] != spec.num_params:
            raise NfgenError(f"weights {tuple(weights.shape)} do not match the architecture (P={spec.num_params})")
        check_finite("weights", weights, "refit the fields (they diverged) before tokenizing")
        n_vectors = weights.shape[0] * spec.num_params // cfg.group
        if n_vectors < cfg.codebook_size:
            raise NfgenError(f"{n_vectors} weight vectors cannot fill {cfg.codebook_size} codes; "
                             f"lower --codebook-size or tokenize more fields")
        basis = stds = class_centers = counts = groups = None
        offsets = weights
        if cfg.center == "class":
            class_centers, counts = cls.class_means(weights, labels, n_classes)
            groups = torch.as_tensor(labels).long().cpu()
            if cfg.modes > 1:
                class_centers, groups = cls.class_modes(weights, groups, class_centers, cfg.modes, cfg.seed)
            offsets = weights - class_centers.to(weights.device)[groups.to(weights.device)]
        if cfg.basis == "pca":
            center, basis, stds = cls.principal_basis(offsets)
        elif cfg.basis == "class-pca":
            center, basis, stds = cls.class_principal_bases(offsets, groups, len(class_centers), cfg.shrinkage)
        else:
            center = cls.mean_field(offsets, "none" if cfg.center == "class" else cfg.center)
        scales = cls.tensor_scales(offsets - center.to(weights.device), spec, cfg.normalize)
        tok = cls(spec, cfg, torch.zeros(cfg.levels, cfg.codebook_size, cfg.group), scales, center, basis, stds,
                  class_centers, None if counts is None else counts.float())
        residual = tok._vectors(weights, labels, tok.assign_modes(weights, labels))
        codebooks = []
        for level in range(cfg.levels):
            cb = None if callback is None else (lambda it, mse, level=level: callback(level, it, mse))
            codes, _ = kmeans(residual, cfg.codebook_size, iters=cfg.iters, seed=cfg.seed + level,
                              sample=cfg.sample or None, backend=cfg.backend, callback=cb)
            codebooks.append(codes)
            if level + 1 < cfg.levels:
                residual = residual - codes[tok._assign(residual, codes)]
        tok.codebooks = torch.stack(codebooks).cpu()
        return tok

    def _assign(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([vq_assign(x[s:s + ENCODE_CHUNK], codes, backend=self.cfg.backend)
                          for s in range(0, x.shape[0], ENCODE_CHUNK)]) if x.shape[0] else x.new_zeros(0).long()

    def encode(self, weights: torch.Tensor, labels=None) -> torch.Tensor:
        """weights [N, P] (and, center "class", their classes [N]) → int64 tokens [N, L] (on weights' device); with
        modes, the first token is each field's mode (`assign_modes`)."""
        modes = self.assign_modes(weights, labels)
        residual = self._vectors(weights, labels, modes)
        K, levels = self.cfg.codebook_size, self.cfg.levels
        codebooks = self.codebooks.to(residual.device)
        tokens = torch.empty(residual.shape[0], levels, dtype=torch.int64, device=residual.device)
        for level in range(levels):
            idx = self._assign(residual, codebooks[level])
            tokens[:, level] = idx + level * K
            if level + 1 < levels:
                residual = residual - codebooks[level][idx]
        tokens = tokens.reshape(weights.shape[0], self.n_components)
        k = self.cfg.coarse
        if k:  # each of the first k codes after its bin
            bins = torch.bucketize(codebooks[0, tokens[:, :k], 0], self.coarse_edges(tokens.device))
            tokens = torch.cat([torch.stack([bins, tokens[:, :k]], dim=2).flatten(1), tokens[:, k:]], dim=1)
        return tokens if modes is None else torch.cat([modes[:, None], tokens], dim=1)

    def decode(self, tokens: torch.Tensor, labels=None) -> torch.Tensor:
        """int64 tokens [N, L] (and, center "class", the fields' classes [N]) → float32 weights [N, P] (on tokens'
        device)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.tokens_per_field:
            raise NfgenError(f"tokens {tuple(tokens.shape)} are not [N, {self.tokens_per_field}] sequences of this "
                             f"tokenizer; use the tokens file the model was trained on")
        tokens = tokens.long()
        ranges = self.token_ranges().to(tokens.device)
        bad = (tokens < ranges[:, 0]) | (tokens >= ranges[:, 1])
        if bad.any():
            where = (f"a mode token is in [0, {self.cfg.modes}), then " if self.lead else "") + \
                (f"the first {self.cfg.coarse} codes each follow a coarse token in [0, {self.cfg.coarse_levels}); "
                 if self.cfg.coarse else "") + \
                f"codes are [0, {self.n_codes}), level j at positions ≡ j mod {self.cfg.levels}"
            raise NfgenError(f"{int(bad.sum())} token(s) are outside their position's id range ({where}); "
                             f"sample only code tokens for the right level")
        return self.decode_vectors(self.code_vectors(tokens.device)[tokens], labels, self.modes_of(tokens))

    def code_vectors(self, device=None) -> torch.Tensor:
        """[n_codes, group]: the vector each code token stands for (token id j*K + c is code c of level j)."""
        return self.codebooks.to(device).reshape(self.n_codes, self.cfg.group)

    def decode_vectors(self, vectors: torch.Tensor, labels=None, modes=None) -> torch.Tensor:
        """Code vectors [N, L, group] (one per token, e.g. `code_vectors()[tokens]`, or a mean of code vectors
        per position) → float32 weights [N, P]. Linear in `vectors`: residual levels add up, then scale, rotate
        back from the principal components (basis "pca"), centre (center "class": on the class `labels` [N]).
        With modes, position 0 (the mode token) is not read: pass the drawn modes [N] (`modes_of(tokens)`); nor are
        coarse tokens (only `code_positions()` are)."""
        L, g = self.tokens_per_field, self.cfg.group
        if vectors.dim() != 3 or tuple(vectors.shape[1:]) != (L, g):
            raise NfgenError(f"code vectors {tuple(vectors.shape)} are not [N, {L}, {g}] for this tokenizer; "
                             f"use the tokens file the model was trained on")
        n = vectors.shape[0]
        weights = vectors[:, self.code_positions(vectors.device)].float().reshape(n, -1, self.cfg.levels, g).sum(dim=2)
        weights = weights.reshape(n, self.spec.num_params) * self.scale_vector(vectors.device)
        groups = self._groups(labels, modes, n)  # checks the labels and modes before _rotate reads them
        return self._rotate(weights, groups, to_components=False) + self._offsets(groups, vectors.device)

    def _rotate(self, x: torch.Tensor, groups, *, to_components: bool) -> torch.Tensor:
        """Offsets [N, P] → standardised principal components [N, P], or back; the identity with basis "weights".
        With "class-pca" each field turns by its class's (or mode's) basis: `groups` [N] (already checked)."""
        if self.basis is None:
            return x
        if self.basis.dim() == 2:
            parts = [(slice(None), self.basis, self.basis_stds)]
        else:
            groups = groups.to(x.device)
            parts = [(groups == c, self.basis[c], self.basis_stds[c]) for c in groups.unique().tolist()]
        out = torch.empty_like(x)
        for rows, basis, stds in parts:
            basis, stds = basis.to(x.device), stds.to(x.device)
            out[rows] = (x[rows] @ basis) / stds if to_components else (x[rows] * stds) @ basis.T
        return out

    # ------------------------------------------------------------------ storage
    def state_tensors(self) -> dict[str, torch.Tensor]:
        pca = {} if self.basis is None else {"basis": self.basis, "basis_stds": self.basis_stds}
        by_class = {} if self.class_centers is None else {"class_centers": self.class_centers,
                                                          "class_prior": self.class_prior}
        return {"codebooks": self.codebooks, "scales": self.scales, "center": self.center, **pca, **by_class}

    def state_meta(self) -> dict:
        cfg = {k: v for k, v in asdict(self.cfg).items() if k != "quiet"}
        return {"tokenizer": cfg, "spec": self.spec.to_dict(), "n_codes": self.n_codes,
                "tokens_per_field": self.tokens_per_field, "bits_per_field": self.bits_per_field}

    @classmethod
    def from_state(cls, tensors: dict, meta: dict) -> "WeightTokenizer":
        known = set(TokenizerConfig.__dataclass_fields__)
        # tokens files from before centring existed hold no centre: they quantised the raw weights
        cfg = TokenizerConfig(**{"center": "none", **{k: v for k, v in meta["tokenizer"].items() if k in known}})
        needed = ["center"] if cfg.center != "none" or cfg.basis != "weights" else []
        needed += ["basis", "basis_stds"] if cfg.basis != "weights" else []
        needed += ["class_centers", "class_prior"] if cfg.center == "class" else []
        for name in needed:
            if name not in tensors:
                raise KeyError(f"no {name!r} tensor")
        return cls(SirenSpec.from_dict(meta["spec"]), cfg, tensors["codebooks"], tensors["scales"],
                   tensors.get("center"), tensors.get("basis"), tensors.get("basis_stds"),
                   tensors.get("class_centers"), tensors.get("class_prior"))


def check_mode_counts(labels, modes: int) -> None:
    """Refuse a class with fields but fewer than `modes` of them (k-means cannot split it)."""
    labels = torch.as_tensor(labels).long().cpu()
    counts = torch.bincount(labels[labels >= 0])
    short = torch.nonzero((counts > 0) & (counts < modes)).flatten()
    if modes > 1 and len(short):
        c = int(short[0])
        raise NfgenError(f"class {c} has {int(counts[c])} field(s), fewer than --modes {modes}; lower --modes or "
                         f"tokenize more fields")


@dataclass
class TokenSet:
    tokens: torch.Tensor  # [N, L] int64 in [0, tokenizer.n_codes)
    labels: torch.Tensor  # [N] int64
    tokenizer: WeightTokenizer
    spec: SirenSpec
    image_shape: tuple
    meta: dict = field(default_factory=dict)


def save_tokens(path, ts: TokenSet) -> Path:
    """One "tokens" artifact: tokens (int32 on disk), labels, codebooks, scales + metadata."""
    meta = {**ts.meta, **ts.tokenizer.state_meta(), "image_shape": list(ts.image_shape)}
    small = torch.int16 if ts.tokenizer.n_codes <= 32767 else torch.int32
    tensors = {"tokens": ts.tokens.to(small), "labels": ts.labels.long(), **ts.tokenizer.state_tensors()}
    return save_artifact(path, "tokens", tensors, meta)


def load_tokens(path, hint: str = TOKENIZE_HINT) -> TokenSet:
    tensors, meta = load_artifact(path, "tokens", hint)
    fix = f"; {hint}" if hint else ""
    missing = [k for k in ("tokens", "labels", "codebooks", "scales") if k not in tensors]
    if missing or not all(k in meta for k in ("tokenizer", "spec", "image_shape")):
        raise NfgenError(f"{path} is an incomplete tokens file (missing {missing or 'metadata'}); recreate it{fix}")
    from nfgen.fields import stored_image_shape

    image_shape = stored_image_shape(meta["image_shape"], path, fix)
    try:
        tok = WeightTokenizer.from_state(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NfgenError(f"{path} has an invalid tokenizer ({exc}); recreate it{fix}") from None
    for name, t in tok.state_tensors().items():  # NaN codebooks would decode into NaN weights much later
        check_finite(f"{path}: {name}", t, f"the file is corrupt; recreate it{fix}")
    tokens, labels = tensors["tokens"].long(), tensors["labels"].long()
    if tokens.dim() != 2 or tokens.shape[1] != tok.tokens_per_field or labels.shape != (tokens.shape[0],):
        raise NfgenError(f"{path}: tokens {tuple(tokens.shape)} / labels {tuple(labels.shape)} do not match its "
                         f"tokenizer (L={tok.tokens_per_field}); recreate it{fix}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= tok.n_codes):
        raise NfgenError(f"{path} holds token ids outside [0, {tok.n_codes}); recreate it{fix}")
    return TokenSet(tokens=tokens, labels=labels, tokenizer=tok, spec=tok.spec, image_shape=image_shape, meta=meta)


def _reference_images(fields, data_root, device):
    """The images the fields were fitted to, or (data unavailable) the fitted fields' own renders."""
    from nfgen.fields import render_fields

    source = fields.meta.get("source")
    source = source if isinstance(source, dict) else {}  # a hand-edited file: fall back to the renders
    split_spec = source.get("split", fields.meta.get("split"))
    indices = source.get("indices", fields.meta.get("indices"))
    if split_spec is not None and indices is not None:
        try:
            from nfgen.data import load_split

            split = load_split(split_spec, data_root=data_root)
            row = {int(i): r for r, i in enumerate(split.indices.tolist())}
            if all(int(i) in row for i in indices):
                images = split.images[[row[int(i)] for i in indices]]
                if tuple(images.shape[1:]) == tuple(fields.image_shape):
                    return images.to(device), "images", split.n_classes
        except NfgenError:
            pass
    return render_fields(fields.weights, fields.spec, fields.image_shape, device=device), "fitted fields", None


def run_tokenize(fields_path, out_path, cfg: TokenizerConfig, *, data_root=None, device="auto",
                 quiet: bool = False) -> dict:
    """Fit the tokenizer on a fields file, encode every field, write the tokens file; return a summary."""
    from nfgen.fields import load_fields, psnr, render_fields

    quiet = quiet or cfg.quiet
    fields = load_fields(fields_path)  # refuses NaN/inf weights
    cfg.validate(fields.spec.num_params)
    dev = pick_device(device)
    weights = fields.weights.to(dev)
    reference, against, n_classes = _reference_images(fields, data_root, dev)
    n_classes = int(n_classes if n_classes is not None else int(fields.labels.max()) + 1)
    if cfg.modes > 1:  # before the progress bar: a refusal is then the only line on stderr
        check_mode_counts(fields.labels, cfg.modes)

    t0 = time.perf_counter()  # after the loads: seconds_fit is the k-means alone
    total = cfg.levels * (cfg.iters + 1)
    with progress(total=total, quiet=quiet, desc="tokenize k-means") as bar:
        def on_iter(level, it, mse):
            bar.update(1)
            bar.set_postfix(level=level, mse=f"{mse:.3g}")

        tok = WeightTokenizer.fit(weights, fields.spec, cfg, labels=fields.labels, n_classes=n_classes,
                                  callback=on_iter)
    t_fit = time.perf_counter() - t0
    tokens = tok.encode(weights, fields.labels)
    detok = tok.decode(tokens, fields.labels)
    t_encode = time.perf_counter() - t0 - t_fit

    detok_psnr = psnr(render_fields(detok, fields.spec, fields.image_shape, device=dev), reference).cpu()
    weight_rel_err = float((detok - weights).pow(2).mean() / weights.pow(2).mean())
    summary = {
        "fields": str(fields_path), "out": str(out_path), "n_fields": int(weights.shape[0]),
        "n_codes": tok.n_codes, "tokens_per_field": tok.tokens_per_field, "bits_per_field": tok.bits_per_field,
        "detok_psnr": float(detok_psnr.mean()), "detok_psnr_min": float(detok_psnr.min()),
        "psnr_against": against, "fields_psnr": float(fields.psnr.mean()),
        "weight_rel_mse": weight_rel_err, "seconds_fit": round(t_fit, 3), "seconds_encode": round(t_encode, 3),
        "device": str(dev),
    }
    meta = {"source_fields": str(fields_path), "source": fields.meta.get("source"),
            "n_classes": n_classes,
            "detok_psnr": summary["detok_psnr"], "detok_psnr_min": summary["detok_psnr_min"],
            "psnr_against": against, "weight_rel_mse": weight_rel_err}
    save_tokens(out_path, TokenSet(tokens.cpu(), fields.labels, tok, fields.spec, fields.image_shape, meta))
    if not quiet:
        print(f"tokenized {summary['n_fields']} fields → {tok.tokens_per_field} tokens each "
              f"({tok.bits_per_field:.0f} bits/field, {tok.n_codes} codes); de-tokenized PSNR "
              f"{summary['detok_psnr']:.2f} dB vs {against} (fields: {summary['fields_psnr']:.2f} dB); {out_path}")
    return summary
