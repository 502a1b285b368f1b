"""Sample new fields: the GPT writes token sequences, the tokenizer turns them into weights.

A batch runs as: prefill [SOS, CLASS_c | NO_CLASS] through the static KV cache, then L-1 one-token decode
steps. With classifier-free guidance (cfg_scale != 1) every field's conditional and NO_CLASS sequence run
together in one 2B batch and `sample_next` mixes their logits. The decode step keeps all its state in
device tensors (current token, position, step, per-step seeds), so on CUDA it is captured once in CUDA
graphs and replayed L-1 times with no host sync; on CPU the same step runs eagerly, attending only to the
filled prefix. Attention in a decode step (`attention="auto"`) is SDPA on CUDA (one graph per GRAPH_BUCKET
slots of attended length, masked) and nfkernels.decode_attention's C++ kernel on CPU; `attention="triton"`
uses its Triton kernel on CUDA, which reads the filled length from the position tensor: one graph for all
steps, and no slot past the filled prefix is read.
Per-step seeds come from one generator seeded with `seed`: batch b (fields [b·B, (b+1)·B)) decodes with
its b-th draw of L seeds, so a fixed seed and batch size give the same tokens.

Under `torchrun --nproc-per-node K -m nfgen generate …` the batches are split into K contiguous runs
(`shard_range` over batch indices); each rank skips the seed draws of the batches before its own, decodes
its batches and the rows are all-gathered, so the result equals a one-process run with the same seed and
batch size bit for bit (the batch boundaries matter: the sampler's RNG is keyed by row within a batch).
Rank 0 writes the samples. Without --batch-size, CUDA ranks agree on the smallest of their free-memory
defaults, which a run with another number of GPUs may not pick: pass --batch-size to compare across them.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nfgen import distributed
from nfgen.common import make_generator, pick_device, progress
from nfgen.io import NfgenError
from nfgen.model import ATTENTION, GPT, load_model
from nfgen.vocab import Vocab
from nfkernels._ext import BACKENDS, HAS_TRITON, has_op, resolve_backend
from nfkernels.sampling import draw_seed, filtered_logits, sample_next

if TYPE_CHECKING:
    from nfgen.tokenizer import TokenSet

WEIGHTS = ("sampled", "expected")  # what a generated field's weights are (SampleConfig.weights)
# the unconditional samples' classes (--center class) come from a generator seeded apart from the token seeds': on
# the CPU the two would otherwise read one Mersenne-Twister stream from the same start
CLASS_DRAW_SEED_OFFSET = 0x5EED_C1A55
GRID_COLUMNS = 20  # samples.png shows at most this many samples per class (the fields file has them all)
GRAPH_BUCKET = 128  # CUDA graphs are captured per attended-length bucket, so early steps read a short cache


@dataclass
class SampleConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    cfg_scale: float = 1.0  # 1: no guidance
    seed: int = 0
    batch_size: int | None = None  # fields per batch; None: 64 on CPU, from free memory on CUDA
    backend: str = "auto"  # sampling op backend
    # decode-step attention: sdpa (a CUDA graph per 128-slot bucket), triton (one graph), cpp (the CPU kernel);
    # auto: sdpa on CUDA, cpp on CPU (sdpa for a model that is not float32 or without the C++ build)
    attention: str = "auto"
    cuda_graph: bool = True  # capture the decode step in CUDA graphs (CUDA only)
    # "sampled": a field's weights are its drawn tokens' code values. "expected": each weight is instead the mean
    # code value under the distribution its token was drawn from (after temperature / top-k / top-p / CFG),
    # while the drawn token still conditions the rest of the sequence: the same samples with the draw's
    # scatter around the model's prediction taken out of the weights.
    weights: str = "sampled"
    # with weights "expected": the first position whose weight is its expected code value; the positions before it
    # keep their drawn tokens' values (0: every position expected). With coarse-to-fine tokens (--basis class-pca)
    # a field keeps its drawn coarse components and takes the model's mean of each fine one (a truncation trick):
    # on the CPU quality run the small GPT's fine draws add scatter that SSIM pays for, and drawing only the first
    # 32 of 1185 cut MMD from 0.278 to 0.251 and lifted accuracy from 0.90 to 0.935 (docs/quality.md). A mode token
    # (tokenize --modes) is not counted: it always keeps its draw, and K counts the code tokens after it (coarse
    # tokens, tokenize --coarse, are not counted either)
    expected_from: int = 0
    quiet: bool = False

    def validate(self) -> None:
        checks = [
            (self.temperature > 0,
             f"--temperature must be > 0, got {self.temperature}; for the most likely code use --top-k 1"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"--top-k must be an integer ≥ 0 (0: off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.cfg_scale == self.cfg_scale and abs(self.cfg_scale) < float("inf"), "--cfg-scale must be finite"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.attention in ("auto",) + ATTENTION,
             f"--attention must be one of auto, {', '.join(ATTENTION)}, got {self.attention!r}"),
            (self.weights in WEIGHTS, f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}"),
            (isinstance(self.expected_from, int) and self.expected_from >= 0,
             f"--expected-from must be a position ≥ 0, got {self.expected_from}"),
            (self.expected_from == 0 or self.weights == "expected",
             f"--expected-from {self.expected_from} picks where expected weights begin; add --weights expected"),
        ]
        for ok, msg in checks:
            if not ok:
                raise NfgenError(msg)


def default_batch_size(model: GPT, length: int, device: torch.device, guided: bool) -> int:
    """64 on CPU; on CUDA as many as the KV cache fits in half the free memory (≤ 1024, a multiple of 64)."""
    if device.type != "cuda":
        return 64
    c = model.config
    free, _ = torch.cuda.mem_get_info(device)
    per_row = c.n_layer * 2 * (length + 1) * c.n_kv_head * c.head_dim * 2 + 64 * c.n_embd * 4 + 8 * c.vocab_size * 4
    rows = int(0.5 * free // per_row) // (2 if guided else 1)
    return max(1, min(1024, rows // 64 * 64 if rows >= 64 else rows))


def decode_attention_impl(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """SampleConfig.attention → what forward_cached runs: "sdpa" or a decode_attention backend ("triton", "cpp").

    auto: sdpa on CUDA (graphs per bucket; the Triton kernel saves only the unread tail of the last bucket,
    docs/kernels.md), the C++ kernel on CPU for a float32 model when it is built (1.23x faster generation than
    SDPA, README), else sdpa. An explicit kernel that cannot run here is refused (NfgenError).
    """
    if choice == "sdpa":
        return choice
    if choice == "auto":
        ok = device.type == "cpu" and dtype == torch.float32 and has_op("decode_attention")
        return "cpp" if ok else "sdpa"
    try:
        resolve_backend(choice, device, "decode_attention", cpp=dtype == torch.float32, cuda=False,
                        triton=HAS_TRITON)
    except ValueError as exc:
        raise NfgenError(f"--attention {choice}: {exc}; use --attention sdpa") from None
    return choice


class Decoder:
    """Generates `batch_size` token sequences of length `length` at a time through a static KV cache.

    With `code_vectors` [n_codes, g] it also records, per position, the mean of those vectors under the
    distribution the token was drawn from (`self.values` [batch, length, g]).
    """

    def __init__(self, model: GPT, vocab: Vocab, batch_size: int, length: int, cfg: SampleConfig,
                 device: torch.device, token_ranges: torch.Tensor | None = None, static_shapes: bool = False,
                 code_vectors: torch.Tensor | None = None):
        self.model, self.vocab, self.cfg, self.device = model, vocab, cfg, device
        self.batch, self.length = batch_size, length
        self.guided = cfg.cfg_scale != 1.0
        self.rows = 2 * batch_size if self.guided else batch_size
        self.max_len = length + 1  # SOS, CLASS, t_1 … t_{L-1} are fed; t_L is only sampled
        dtype = next(model.parameters()).dtype
        model.setup_kv_cache(self.rows, self.max_len, device, dtype)
        # Static state of the decode step, updated in place (inside the graph on CUDA).
        self.tok = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.seeds = torch.zeros(length, dtype=torch.long, device=device)
        self.out = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.code_vectors = self.values = None
        if code_vectors is not None:
            if code_vectors.dim() != 2 or code_vectors.shape[0] != vocab.n_codes:
                raise ValueError(f"code_vectors must be [{vocab.n_codes}, g], got {tuple(code_vectors.shape)}")
            self.code_vectors = code_vectors.float().to(device)
            self.values = torch.zeros(batch_size, length, code_vectors.shape[1], device=device)
        self.allowed = None  # [L, n_codes] bool: which codes each position may take (residual VQ levels)
        if token_ranges is not None:
            codes = torch.arange(vocab.n_codes)
            allowed = (codes[None] >= token_ranges[:, :1]) & (codes[None] < token_ranges[:, 1:])
            if not allowed.all():
                self.allowed = allowed.to(device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.attention = decode_attention_impl(cfg.attention, device, dtype)
        # static_shapes: decode with the graphs' fixed shapes (attention over a whole bucket, masked) even
        # without capturing; lets CPU tests check exactly what the graphs compute. The decode-attention kernels
        # have one fixed-shape step only (they read the filled length from self.pos), so they always take it.
        self.static_shapes = static_shapes or self.attention != "sdpa"
        if device.type == "cuda" and cfg.cuda_graph and length >= 2:
            self._capture()
            self.static_shapes = True

    def _sample(self, logits: torch.Tensor, seed: torch.Tensor,
                allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ the drawn tokens [batch], and (with code_vectors) the mean code vector of the draw's distribution."""
        logits = logits[:, :self.vocab.n_codes]  # only code tokens may be sampled
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        c = self.cfg
        cond, uncond = (logits[:self.batch], logits[self.batch:]) if self.guided else (logits, None)
        nxt = sample_next(cond, c.temperature, c.top_k, c.top_p, uncond_logits=uncond,
                          cfg_scale=c.cfg_scale, seed=seed, backend=c.backend)
        if self.code_vectors is None:
            return nxt, None
        probs = torch.softmax(filtered_logits(cond, c.temperature, c.top_k, c.top_p, uncond, c.cfg_scale), dim=1)
        return nxt, probs @ self.code_vectors

    def _decode_step(self, kv_len: int | None) -> None:
        """Feed self.tok at self.pos, sample token number self.step, advance. Device tensors only."""
        logits = self.model.forward_cached(self.tok, self.pos, kv_len=kv_len, attention=self.attention)[:, -1]
        allowed = None if self.allowed is None else self.allowed.index_select(0, self.step)
        nxt, mean = self._sample(logits, self.seeds.index_select(0, self.step), allowed)
        self.out.index_copy_(1, self.step, nxt[:, None])
        if mean is not None:
            self.values.index_copy_(1, self.step, mean[:, None])
        self.tok.copy_((nxt.repeat(2) if self.guided else nxt)[:, None])
        self.pos.add_(1)
        self.step.add_(1)

    def _buckets(self) -> list[int]:
        if self.attention != "sdpa":  # one bucket (one graph): the kernel stops at pos + 1 by itself
            return [self.max_len]
        return sorted({min(self.max_len, b) for b in range(GRAPH_BUCKET, self.max_len + GRAPH_BUCKET, GRAPH_BUCKET)})

    def _capture(self) -> None:
        # Warm up on a side stream (cuBLAS handles, Triton compilation), then capture one graph per bucket;
        # they run one after another, so they can share one memory pool.
        def reset():
            self.tok.zero_(), self.pos.fill_(2), self.step.fill_(1)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for kv_len in self._buckets():
                reset()
                self._decode_step(kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = None
        for kv_len in self._buckets():
            reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_step(kv_len)
            pool = graph.pool()
            self.graphs[kv_len] = graph

    def run(self, class_tokens: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """class_tokens [batch] (CLASS_c or NO_CLASS ids), seeds [L] → tokens [batch, L] (a view of a buffer;
        self.values holds the matching mean code vectors when the decoder has code_vectors)."""
        v = self.vocab
        cls = torch.cat([class_tokens, torch.full_like(class_tokens, v.no_class)]) if self.guided else class_tokens
        idx = torch.stack([torch.full_like(cls, v.sos), cls], dim=1)
        self.seeds.copy_(seeds)
        logits = self.model.forward_cached(idx, torch.arange(2, device=self.device), kv_len=2)[:, -1]
        first, mean = self._sample(logits, seeds[:1], None if self.allowed is None else self.allowed[:1])
        self.out[:, 0] = first
        if mean is not None:
            self.values[:, 0] = mean
        self.tok.copy_((first.repeat(2) if self.guided else first)[:, None])
        self.pos.fill_(2)
        self.step.fill_(1)
        buckets = self._buckets()
        for i in range(1, self.length):  # token i is sampled after feeding token i-1 at position i + 1
            kv_len = i + 2  # positions 0 … i + 1 are filled once this step has written its keys
            if not self.static_shapes:
                self._decode_step(kv_len)
                continue
            while buckets[0] < kv_len:  # the smallest bucket that holds the filled prefix
                buckets.pop(0)
            if self.graphs:
                self.graphs[buckets[0]].replay()
            else:
                self._decode_step(buckets[0])
        return self.out


@torch.no_grad()
def generate_tokens(model: GPT, vocab: Vocab, classes: torch.Tensor, length: int, cfg: SampleConfig,
                    device="cpu", token_ranges: torch.Tensor | None = None,
                    code_vectors: torch.Tensor | None = None):
    """Sample one L-token sequence per entry of `classes` [B] (-1: unconditional) → int64 [B, L] on `device`.

    `token_ranges` [L, 2] optionally restricts position i to codes [lo, hi) (residual VQ levels).
    With `code_vectors` [n_codes, g] → (tokens, float32 [B, L, g]): also each position's mean code vector under
    the distribution its token was drawn from.
    Under torchrun each rank decodes its share of the batches and every rank returns all B rows.
    """
    cfg.validate()
    device = torch.device(device)
    c = model.config
    if c.vocab_size != vocab.size:
        raise NfgenError(f"the model's vocabulary ({c.vocab_size}) is not this tokenizer's ({vocab.size} = "
                         f"{vocab.n_codes} codes + 2 + {vocab.n_classes} classes); use the matching tokens file")
    if length < 1 or length + 1 > c.block_size:
        raise NfgenError(f"cannot sample {length} tokens with a model of block size {c.block_size} "
                         f"(needs {length + 1}); use the tokens file the model was trained on")
    classes = torch.as_tensor(classes, dtype=torch.long).cpu()
    if classes.numel() and (classes.min() < -1 or classes.max() >= vocab.n_classes):
        raise NfgenError(f"class ids must be in [-1, {vocab.n_classes}), got {classes.min()}..{classes.max()}")
    if token_ranges is not None and tuple(token_ranges.shape) != (length, 2):
        raise ValueError(f"token_ranges must be [{length}, 2], got {tuple(token_ranges.shape)}")
    decode_attention_impl(cfg.attention, device, next(model.parameters()).dtype)  # refuse before any work
    class_tokens = torch.where(classes < 0, vocab.no_class, vocab.n_codes + 2 + classes).to(device)
    model = model.to(device).eval()
    if device.type == "cuda" and next(model.parameters()).dtype == torch.float32 and torch.cuda.is_bf16_supported():
        model = copy.deepcopy(model).to(torch.bfloat16)  # decoding is bandwidth-bound: halve the bytes
    n = classes.numel()
    out = torch.empty(n, length, dtype=torch.long, device=device)
    values = None if code_vectors is None else torch.empty(n, length, code_vectors.shape[-1], device=device)
    if n == 0:
        return out if values is None else (out, values)
    bs = min(cfg.batch_size or default_batch_size(model, length, device, cfg.cfg_scale != 1.0), n)
    if cfg.batch_size is None:
        bs = distributed.all_reduce_min(bs)  # under torchrun every rank must cut the same batches
    world, n_batches = distributed.world_size(), -(-n // bs)
    rows = [range(min(n, b.start * bs), min(n, b.stop * bs))
            for b in (distributed.shard_range(n_batches, r, world) for r in range(world))]
    mine = rows[distributed.rank()]
    gen = make_generator(cfg.seed, device)
    for _ in range(mine.start // bs):  # the earlier ranks' batches: draw their seeds to reach this rank's
        draw_seed(gen, device, length)
    decoders: dict[int, Decoder] = {}
    quiet = cfg.quiet or not distributed.is_main()
    for start in progress(range(mine.start, mine.stop, bs), quiet=quiet, desc="generate", unit="batch"):
        chunk = class_tokens[start:start + bs]
        if chunk.numel() not in decoders:  # the full size, and once the smaller last batch
            decoders.clear()
            decoders[chunk.numel()] = Decoder(model, vocab, chunk.numel(), length, cfg, device, token_ranges,
                                              code_vectors=code_vectors)
        decoder = decoders[chunk.numel()]
        out[start:start + bs] = decoder.run(chunk, draw_seed(gen, device, length))
        if values is not None:
            values[start:start + bs] = decoder.values
    counts = [len(r) for r in rows]
    out = distributed.all_gather_rows(out[mine.start:mine.stop], counts)
    return out if values is None else (out, distributed.all_gather_rows(values[mine.start:mine.stop], counts))


def check_expected_from(expected_from: int, tokenizer) -> None:
    """Refuse an --expected-from at or past a field's last code (it counts code tokens: mode and coarse tokens,
    with --modes and --coarse, are not counted)."""
    n = tokenizer.n_components
    if expected_from >= n:
        after = " after its mode token" if tokenizer.lead else ""
        raise NfgenError(f"--expected-from {expected_from} is past the {n} code tokens of a field{after}; use a "
                         f"position below {n}, or --weights sampled")


def generate_weights(model: GPT, vocab: Vocab, classes: torch.Tensor, tokenizer, cfg: SampleConfig,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one field per entry of `classes` → (tokens [B, L], float32 weights [B, P] on CPU).

    The weights are the tokens de-tokenized, or with cfg.weights "expected" each one's mean code value under
    the distribution its token was drawn from (SampleConfig.weights), from position cfg.expected_from on. Tokens
    centred on their class's mean field (--center class) decode only with a class, so there an unconditional field
    (class -1) is drawn ancestrally: a class from the training frequencies (from a generator seeded by cfg.seed +
    CLASS_DRAW_SEED_OFFSET, the same on every rank), then a field of it. A mode token (--modes) is always the drawn
    one, whatever cfg.weights says: it picks the basis the other tokens decode in."""
    length = tokenizer.tokens_per_field
    check_expected_from(cfg.expected_from, tokenizer)
    classes = tokenizer.draw_classes(classes, make_generator(cfg.seed + CLASS_DRAW_SEED_OFFSET))
    args = (model, vocab, classes, length, cfg, device, tokenizer.token_ranges())
    if cfg.weights == "expected":
        codes = tokenizer.code_vectors()
        tokens, vectors = generate_tokens(*args, code_vectors=codes)
        vectors = vectors.cpu()
        drawn = tokenizer.token_position(cfg.expected_from)  # a mode token keeps its draw
        vectors[:, :drawn] = codes[tokens[:, :drawn].cpu()]
        return tokens, tokenizer.decode_vectors(vectors, classes, tokenizer.modes_of(tokens.cpu()))
    tokens = generate_tokens(*args)
    return tokens, tokenizer.decode(tokens.cpu(), classes).float()


def _grid_rows(classes: torch.Tensor, n_classes: int, per_row: int) -> tuple[list[int], list[str]]:
    """Indices of up to `per_row` samples per class (one row each), then one row of unconditional ones."""
    order, labels = [], []
    for c in list(range(n_classes)) + [-1]:
        idx = torch.nonzero(classes == c).flatten()[:per_row].tolist()
        if idx:
            order += idx + [-1] * (per_row - len(idx))
            labels.append(str(c) if c >= 0 else "uncond")
    return order, labels


def check_sample_counts(per_class: int, unconditional: int) -> None:
    if per_class < 0 or unconditional < 0 or per_class + unconditional == 0:
        raise NfgenError("nothing to generate; pass --per-class N and/or --unconditional N with N ≥ 1")


def classes_to_sample(n_classes: int, per_class: int, unconditional: int) -> torch.Tensor:
    """[per_class × class 0, …, per_class × class n-1, unconditional × -1]; refuses an empty request."""
    check_sample_counts(per_class, unconditional)
    return torch.cat([torch.arange(n_classes).repeat_interleave(per_class),
                      torch.full((unconditional,), -1, dtype=torch.long)])


def sample_paths(out_dir) -> tuple[Path, Path]:
    """Where generated fields go: OUT/samples.safetensors and OUT/samples.png."""
    return Path(out_dir) / "samples.safetensors", Path(out_dir) / "samples.png"


def save_samples(out_dir, weights: torch.Tensor, classes: torch.Tensor, spec, image_shape, n_classes: int,
                 meta: dict) -> tuple[Path, Path]:
    """Write generated fields as OUT/samples.safetensors (a fields file, psnr zeros) and a grid OUT/samples.png
    (a row per class, then one of unconditional samples) → their paths."""
    from nfgen.fields import render_fields, save_fields
    from nfgen.render import blank_cells, save_grid

    fields_path, png_path = sample_paths(out_dir)
    conditional = classes[classes >= 0]
    per_class = int(torch.bincount(conditional).max()) if len(conditional) else 0
    unconditional = len(classes) - len(conditional)
    gen_meta = {"generated": True, "psnr": "placeholder zeros: generated fields have no target image", **meta,
                "per_class": per_class, "unconditional": unconditional, "n_classes": n_classes}
    save_fields(fields_path, weights, classes, torch.zeros(len(classes)), spec, image_shape, gen_meta)
    per_row = min(GRID_COLUMNS, per_class or unconditional)
    order, row_labels = _grid_rows(classes, n_classes, per_row)
    images = render_fields(weights, spec, image_shape)
    blank = blank_cells(1, images.shape[1:]).to(images)
    grid = torch.cat([images[i:i + 1] if i >= 0 else blank for i in order])
    save_grid(grid, png_path, nrow=per_row, row_labels=row_labels)
    return fields_path, png_path


@dataclass
class Generator:
    """A trained GPT with the tokens file it learnt from: what sampling fields needs (`load_generator`)."""
    model: GPT
    vocab: Vocab
    tokens: TokenSet
    device: torch.device

    @property
    def n_classes(self) -> int:
        return self.vocab.n_classes

    @property
    def spec(self):
        return self.tokens.spec

    @property
    def image_shape(self) -> tuple:
        return self.tokens.image_shape

    def sample(self, classes, cfg: SampleConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One field per entry of `classes` (-1: unconditional) → (tokens [B, L], float32 weights [B, P] on CPU)."""
        cfg = cfg or SampleConfig(quiet=True)
        cfg.validate()
        classes = torch.as_tensor(classes, dtype=torch.long)
        return generate_weights(self.model, self.vocab, classes, self.tokens.tokenizer, cfg, self.device)


def load_generator(model_path, tokens_path, device="auto") -> Generator:
    """Load a model and the tokens file it was trained on, checking that they belong together."""
    from nfgen.tokenizer import load_tokens
    from nfgen.train import data_fingerprint, make_sequences

    device = pick_device(device)
    model, meta = load_model(model_path, device=device)
    ts = load_tokens(tokens_path, hint="pass the tokens file the model was trained on")
    tok = ts.tokenizer
    n_classes = int(meta.get("n_classes", ts.meta.get("n_classes", 0)))
    if meta.get("n_codes", tok.n_codes) != tok.n_codes or meta.get("tokens_per_field",
                                                                    tok.tokens_per_field) != tok.tokens_per_field:
        raise NfgenError(f"{model_path} was trained on {meta.get('n_codes')} codes × {meta.get('tokens_per_field')} "
                         f"tokens, {tokens_path} has {tok.n_codes} × {tok.tokens_per_field}; "
                         "use the tokens file the model was trained on")
    vocab = Vocab(tok.n_codes, n_classes)
    # the same vocabulary is not enough: the samples decode through this file's codebooks, so they must be the
    # ones the model learnt (a model records the hash of its training sequences; older ones are not checked)
    if "data" in meta and data_fingerprint(make_sequences(ts.tokens, ts.labels, vocab)) != meta["data"]:
        raise NfgenError(f"{model_path} was trained on other tokens than {tokens_path} holds (their sequences "
                         "differ); use the tokens file the model was trained on")
    return Generator(model=model, vocab=vocab, tokens=ts, device=device)


def run_generate(model_path, tokens_path, out_dir, *, per_class: int = 10, unconditional: int = 0,
                 cfg: SampleConfig | None = None, device="auto") -> dict:
    """Sample fields with a trained model; write OUT/samples.safetensors (a fields file) and OUT/samples.png.

    Under torchrun the batches are split over the ranks and rank 0 writes the files."""
    from nfgen.fields import training_split

    cfg = cfg or SampleConfig()
    cfg.validate()
    distributed.init_from_env(device)
    check_sample_counts(per_class, unconditional)  # before loading anything
    gen = load_generator(model_path, tokens_path, device)
    device, n_classes, ts, tok = gen.device, gen.n_classes, gen.tokens, gen.tokens.tokenizer
    classes = classes_to_sample(n_classes, per_class, unconditional)
    t0 = time.perf_counter()
    _, weights = gen.sample(classes, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    n = classes.numel()
    fields_path, png_path = sample_paths(out_dir)
    if distributed.is_main():  # every rank holds all the tokens; rank 0 writes
        save_samples(out_dir, weights, classes, ts.spec, ts.image_shape, n_classes,
                     {"model": str(model_path), "tokens": str(tokens_path), "sampling": asdict(cfg),
                      "training_split": training_split(ts.meta)})
    distributed.barrier()  # no rank returns before the samples exist
    if not cfg.quiet and distributed.is_main():
        print(f"generate {n} fields ({per_class} per class, {unconditional} unconditional) in {seconds:.1f} s "
              f"({n / seconds:.1f} fields/s) → {fields_path}, {png_path}")
    return {"n_fields": n, "samples": str(fields_path), "png": str(png_path), "seconds": round(seconds, 3),
            "fields_per_s": round(n / seconds, 2), "tokens_per_s": round(n * tok.tokens_per_field / seconds, 1),
            "device": str(device), "world_size": distributed.world_size(), "batch_size": cfg.batch_size,
            "sampling": asdict(cfg)}
