"""A decoder-only GPT over token sequences [SOS, CLASS, t_1 … t_L], nanoGPT-style, with a static KV cache.

Pre-LayerNorm blocks, learned positions, attention through F.scaled_dot_product_attention, optionally with
fewer key/value heads than query heads (grouped-query attention, `n_kv_head`): at large batch a decode step
is bound by reading the KV cache, which shrinks by n_head / n_kv_head. Training uses
`forward` (causal over the whole sequence). Generation uses `setup_kv_cache` once and then `forward_cached`:
keys and values go into preallocated [B, kv heads, T_max, head_dim] buffers written in place, so a decode
step has fixed shapes and can be captured in a CUDA graph (optionally with a Triton decode-attention kernel,
nfkernels.decode_attention, that reads only the filled slots; on CPU its C++ op is the fast path). The
embedding and output weights are not tied, so every parameter is its own tensor in the state dict
(safetensors refuses shared storage).

Token ids alone do not say that two codes stand for nearly the same weight. With `value_features` > 0 every
code token also embeds its code vector (through `code_value_features`, stored as a buffer set from the
tokenizer's codebook by `set_code_values`), so from the first step the model sees the previous weights' values
and codes that are close in value start close in embedding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nfgen.io import NfgenError, check_finite, load_artifact, save_artifact
from nfkernels.decode_attention import decode_attention

ATTENTION = ("sdpa", "triton", "cpp")  # how forward_cached attends in a decode step (see there)


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest input: L + 1 for L-token fields (SOS, CLASS, t_1 … t_{L-1})
    # default: 11.3M parameters for 256 codes + 12 specials and 1186 positions; sized so 1187-token fields
    # decode fast (KV-cache reads dominate at large batch) while matching nfgen train's defaults
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0: n_head
    dropout: float = 0.0
    bias: bool = False
    value_features: int = 0  # width of each code token's value features (value_feature_width); 0: ids only
    # add the embedding of the sequence's conditioning token (position 1: CLASS_c or NO_CLASS) to every position's
    # input, so each weight token sees its class directly instead of only through attention to position 1
    class_embed: bool = False
    # > 0: the network node ids of WeightTokenizer.token_roles (n_role_nodes). Each position's input gets the
    # embeddings of the source and destination node of the weight it predicts, so weights of one neuron share
    # an embedding wherever they sit in the sequence
    role_nodes: int = 0

    def __post_init__(self):
        """Refuse (ValueError, naming the field and its valid range) a config no GPT can be built from."""
        for name, low in [("vocab_size", 1), ("block_size", 1), ("n_layer", 1), ("n_head", 1), ("n_embd", 1),
                          ("n_kv_head", 0), ("value_features", 0), ("role_nodes", 0)]:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} {v!r} must be an integer ≥ {low}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout!r} must be in [0, 1)")
        for name in ("bias", "class_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r} must be true or false")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


VALUE_FREQUENCIES = (1, 2, 4, 8)


def value_feature_width(group: int) -> int:
    """Features per code of `group` weights: each coordinate, and its sine and cosine at every frequency."""
    return group * (1 + 2 * len(VALUE_FREQUENCIES))


def code_value_features(values: torch.Tensor) -> torch.Tensor:
    """Code vectors [K, g] → [K, value_feature_width(g)]: each coordinate scaled into [-1, 1] by the codebook's
    largest magnitude, with sin / cos of it at a few frequencies: a smooth basis that lets a linear layer map
    values to embeddings non-linearly."""
    v = values.float() / values.float().abs().amax(dim=0).clamp_min(1e-12)
    return torch.cat([v] + [f(math.pi * k * v) for k in VALUE_FREQUENCIES for f in (torch.sin, torch.cos)], dim=1)


class KVCache(nn.Module):
    """Static per-layer cache; `update` writes the new keys/values at `input_pos` in place."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, d] over a cache k, v [B, H_kv, S, d] with mask [T, S] → [B, H, T, d].

    Query head h reads KV head h // (H / H_kv). The G = H / H_kv query heads of a KV head are folded into
    its query rows, so each KV head is read once rather than expanded G times.
    """
    B, H, T, d = q.shape
    groups = H // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], groups * T, d), k, v, attn_mask=mask.repeat(groups, 1))
    return y.view(B, H, T, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        self.kv_width = cfg.n_kv_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * self.kv_width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x, input_pos=None, mask=None, kv_len=None, attention="sdpa"):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.kv_width, self.kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if input_pos is None:
            if self.n_kv_head != self.n_head:  # training: expanded K/V keep every SDPA backend (flash) usable
                k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            if attention != "sdpa":  # a decode step through nfkernels.decode_attention: slots 0 … input_pos only
                y = decode_attention(q, k, v, input_pos + 1, backend=attention)
            else:
                if kv_len is not None:  # attend over the filled prefix only (eager decoding)
                    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
                y = cached_attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, input_pos=None, mask=None, kv_len=None, attention="sdpa"):
        x = x + self.attn(self.ln_1(x), input_pos, mask, kv_len, attention)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.value_features:
            self.transformer["wve"] = nn.Linear(config.value_features, config.n_embd, bias=False)
            # rows of the special tokens (SOS, NO_CLASS, classes) stay zero
            self.register_buffer("code_features", torch.zeros(config.vocab_size, config.value_features))
        if config.class_embed:  # indexed by token id; only the rows of NO_CLASS and the classes are ever used
            self.transformer["wce"] = nn.Embedding(config.vocab_size, config.n_embd)
        if config.role_nodes:  # id role_nodes: no weight (position 0, which predicts the class)
            self.transformer["wse"] = nn.Embedding(config.role_nodes + 1, config.n_embd)
            self.transformer["wde"] = nn.Embedding(config.role_nodes + 1, config.n_embd)
            self.register_buffer("roles", torch.full((config.block_size, 2), config.role_nodes, dtype=torch.long))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.cache_max_len = 0

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_code_values(self, codebooks: torch.Tensor) -> None:
        """Fill the value features of code tokens from the tokenizer's codebooks [levels, K, g] (token id
        j*K + c is code c of level j; each level scaled on its own, residual levels being smaller)."""
        features = torch.cat([code_value_features(level) for level in codebooks])
        if not self.config.value_features or features.shape[1] != self.config.value_features \
                or len(features) >= self.config.vocab_size:
            raise ValueError(f"codebooks {tuple(codebooks.shape)} do not fit value_features "
                             f"{self.config.value_features} and vocab_size {self.config.vocab_size}")
        self.code_features.zero_()
        self.code_features[:len(features)] = features.to(self.code_features)

    def set_roles(self, token_roles: torch.Tensor) -> None:
        """token_roles [block_size - 1, 2]: (source, destination) node of the weight of t_1 … t_L
        (WeightTokenizer.token_roles); input position p predicts t_p, so it gets row p - 1."""
        c = self.config
        if not c.role_nodes or tuple(token_roles.shape) != (c.block_size - 1, 2) \
                or not 0 <= int(token_roles.min()) <= int(token_roles.max()) < c.role_nodes:
            raise ValueError(f"token roles {tuple(token_roles.shape)} do not fit role_nodes {c.role_nodes} and "
                             f"block_size {c.block_size}")
        self.roles[1:] = token_roles.to(self.roles)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position (+ code value) (+ conditioning token `cond` [B], with class_embed) embeddings."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        if self.config.value_features:
            x = x + self.transformer.wve(self.code_features[idx])
        if self.config.class_embed:
            x = x + self.transformer.wce(cond)[:, None, :]
        if self.config.role_nodes:
            roles = self.roles[pos]
            x = x + self.transformer.wse(roles[:, 0]) + self.transformer.wde(roles[:, 1])
        return x

    def _cond(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The conditioning token of sequences that start at position 0 ([SOS, CLASS, …]); None unless class_embed."""
        if not self.config.class_embed:
            return None
        if idx.shape[1] < 2:
            raise ValueError("a class-embedding GPT needs [SOS, CLASS, …] inputs of at least 2 tokens")
        return idx[:, 1]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] → (logits [B, T, V], mean cross-entropy over targets != -1, or None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.embed(idx, pos, self._cond(idx)))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def setup_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> None:
        """Preallocate a [batch_size, kv heads, max_len, head_dim] key and value cache in every layer."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {self.config.block_size}")
        p = self.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        c = self.config
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_len, c.head_dim, device, dtype)
        self.cache_max_len = max_len
        # each row's conditioning token, set by the prefill and read by every decode step (a static tensor, so
        # CUDA graphs of decode steps see the current batch's classes)
        self.cond_token = torch.zeros(batch_size, dtype=torch.long, device=device)

    def forward_cached(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                       attention: str = "sdpa") -> torch.Tensor:
        """idx [B, T] at positions input_pos [T] (device LongTensor) → logits [B, T, V], through the cache.

        Works for prefill (T > 1, from position 0) and decode (T = 1). Token t attends to cached positions
        <= input_pos[t]. With class_embed the prefill's token 1 is remembered as the rows' conditioning token.
        `kv_len` (a Python int, optional) limits attention to the first kv_len cache slots — cheaper in an
        eager loop; leave it None for fixed shapes (CUDA graphs). Every position < kv_len that a query may
        see must already be written.
        `attention`: "sdpa" masks F.scaled_dot_product_attention by position over the (first kv_len) slots.
        "triton" / "cpp" send a decode step (T = 1) to nfkernels.decode_attention with that backend, which
        reads exactly the input_pos + 1 slots 0 … input_pos (kv_len is not needed): for triton counted on the
        device, so one fixed-shape step serves every position (one CUDA graph) without reading the rest of the
        cache; cpp is the CPU kernel. Prefill (T > 1) always uses sdpa.
        """
        if self.cache_max_len == 0:
            raise RuntimeError("call setup_kv_cache before forward_cached")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if idx.shape[1] > 1:
            attention = "sdpa"
        if attention != "sdpa":
            mask = None  # CausalSelfAttention calls decode_attention over input_pos + 1 slots
        else:
            n_keys = self.cache_max_len if kv_len is None else kv_len
            mask = torch.arange(n_keys, device=idx.device)[None, :] <= input_pos[:, None]  # [T, n_keys]
        cond = None
        if self.config.class_embed:
            if idx.shape[1] > 1:
                self.cond_token.copy_(self._cond(idx))
            cond = self.cond_token
        x = self.embed(idx, input_pos, cond)
        for block in self.transformer.h:
            x = block(x, input_pos, mask, kv_len, attention)
        return self.lm_head(self.transformer.ln_f(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- checkpoints -------------------------------------------------------------------------------------------

def save_model(path, model: GPT, meta: dict, weights: dict | None = None) -> None:
    """Write the weights (the model's own, or `weights`: a state dict of it) with meta (plus {"config":
    asdict(model.config)}) as a "model" artifact."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    save_artifact(path, "model", dict(model.state_dict() if weights is None else weights),
                  {**meta, "config": asdict(model.config)})


def load_model(path, device="cpu", hint: str = "run `nfgen train` first") -> tuple[GPT, dict]:
    """Read a "model" artifact → (GPT in eval mode on `device`, meta)."""
    tensors, meta = load_artifact(path, "model", hint)
    known = {f.name for f in fields(GPTConfig)}
    raw = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not {"vocab_size", "block_size"} <= raw.keys():
        raise NfgenError(f"{path} has no GPT config in its metadata; re-save it with nfgen train")
    try:  # GPTConfig checks every field; GPT itself may still refuse what it cannot build
        model = GPT(GPTConfig(**{k: v for k, v in raw.items() if k in known}))
    except (TypeError, ValueError, RuntimeError, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NfgenError(f"{path} holds an invalid model config ({reason}); retrain it with nfgen train") from None
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise NfgenError(f"{path} does not match its GPT config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, wrong shape {wrong[:3]}); re-save it with nfgen train")
    for k, t in tensors.items():
        check_finite(f"{path}: {k}", t, "the checkpoint diverged; retrain or use an earlier checkpoint")
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta
