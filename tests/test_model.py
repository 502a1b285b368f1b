"""nfgen.model: the static-KV-cache paths against plain full recomputation, and checkpoints."""
import pytest
import torch

from nfgen.io import NfgenError, save_artifact
from nfgen.model import GPT, GPTConfig, code_value_features, load_model, save_model, value_feature_width

TOL = dict(atol=1e-5, rtol=1e-5)  # float32; cached and full attention differ only in summation order


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=23, block_size=19, n_layer=2, n_head=3, n_embd=24, bias=True)
    cfg.update(kw)
    m = GPT(GPTConfig(**cfg)).eval()
    if m.config.value_features:  # 20 codes: two residual levels of 10
        m.set_code_values(torch.randn(2, 10, m.config.value_features // value_feature_width(1)))
    if m.config.role_nodes:  # random edges, so a wrong position index shows
        m.set_roles(torch.randint(0, m.config.role_nodes, (m.config.block_size - 1, 2)))
    return m


def test_forward_loss_ignores_minus_one():
    m = small_model()
    idx = torch.randint(0, 23, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 23) and loss is None
    targets = torch.randint(0, 23, (3, 11))
    targets[:, :4] = -1
    _, loss = m(idx, targets)
    want = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 23), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, want)


# MHA, MQA, GQA, MQA with value features, GQA with value features and the class embedding, and MQA with the
# class embedding and weight roles (every path must see the same embeddings)
HEADS = [dict(n_head=3), dict(n_head=3, n_kv_head=1), dict(n_head=4, n_kv_head=2),
         dict(n_head=3, n_kv_head=1, value_features=value_feature_width(1)),
         dict(n_head=4, n_kv_head=2, value_features=value_feature_width(1), class_embed=True),
         dict(n_head=3, n_kv_head=1, class_embed=True, role_nodes=5)]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("prefill", [1, 2, 7])
def test_forward_cached_matches_forward(prefill, heads):
    if heads.get("class_embed") and prefill < 2:
        pytest.skip("a class-embedding model takes its class from a prefill of [SOS, CLASS]")
    m = small_model(**heads)
    idx = torch.randint(0, 23, (5, 19))
    with torch.no_grad():
        full, _ = m(idx)
        for kv_len in (None, "prefix"):
            m.setup_kv_cache(5, 19)
            got = [m.forward_cached(idx[:, :prefill], torch.arange(prefill),
                                    kv_len=prefill if kv_len else None)]
            for t in range(prefill, 19):
                got.append(m.forward_cached(idx[:, t:t + 1], torch.tensor([t]), kv_len=t + 1 if kv_len else None))
            torch.testing.assert_close(torch.cat(got, dim=1), full, **TOL)


@pytest.mark.parametrize("heads", HEADS)
def test_greedy_cached_decoding_equals_full_recompute(heads):
    """nanoGPT's generate (recompute the whole prefix, argmax) vs one-token steps through the cache."""
    m = small_model(seed=3, vocab_size=31, block_size=40, **heads)
    prompt = torch.randint(0, 31, (4, 2))
    steps = 38
    with torch.no_grad():
        seq = prompt.clone()
        for _ in range(steps):
            logits, _ = m(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        m.setup_kv_cache(4, 40)
        logits = m.forward_cached(prompt, torch.arange(2))[:, -1]
        cached = [logits.argmax(-1)]
        for i in range(steps - 1):
            pos = torch.tensor([2 + i])
            cached.append(m.forward_cached(cached[-1][:, None], pos)[:, -1].argmax(-1))
    assert torch.equal(torch.stack(cached, 1), seq[:, 2:])


def test_grouped_query_attention_is_attention_with_shared_kv_heads():
    """A GQA model equals the plain multi-head model whose K/V projections repeat each KV head's rows for
    the query heads that share it (head h reads KV head h // groups), in training and cached decoding."""
    gqa = small_model(seed=2, n_head=4, n_kv_head=2)
    mha = small_model(seed=9, n_head=4)
    state = dict(gqa.state_dict())
    d, groups = 6, 2
    for i in range(2):
        key = f"transformer.h.{i}.attn.c_attn"
        for part in ("weight", "bias"):
            w = state[f"{key}.{part}"]
            q, k, v = w[:24], w[24:36], w[36:48]
            k, v = (t.reshape(2, d, *t.shape[1:]).repeat_interleave(groups, 0).reshape(24, *t.shape[1:])
                    for t in (k, v))
            state[f"{key}.{part}"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (48, 24)  # 24 query + 2 × 12 key/value rows
    idx = torch.randint(0, 23, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], **TOL)
        gqa.setup_kv_cache(3, 19)
        assert gqa.transformer.h[0].attn.kv_cache.k.shape == (3, 2, 19, 6)
        got = torch.cat([gqa.forward_cached(idx[:, :4], torch.arange(4))] +
                        [gqa.forward_cached(idx[:, t:t + 1], torch.tensor([t])) for t in range(4, 19)], dim=1)
        torch.testing.assert_close(got, mha(idx)[0], **TOL)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(vocab_size=10, block_size=5, n_head=4, n_kv_head=3, n_embd=16)


def test_cache_dtype_and_errors():
    m = small_model()
    with pytest.raises(RuntimeError):
        m.forward_cached(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError):
        m.setup_kv_cache(2, 20)  # > block_size
    with pytest.raises(ValueError):
        m(torch.zeros(1, 20, dtype=torch.long))
    m.setup_kv_cache(2, 8, dtype=torch.bfloat16)
    assert m.transformer.h[0].attn.kv_cache.k.dtype == torch.bfloat16
    assert m.transformer.h[0].attn.kv_cache.k.shape == (2, 3, 8, 8)
    assert not any("kv_cache" in k for k in m.state_dict())  # caches are never saved
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=10, block_size=5, n_head=3, n_embd=16)


@pytest.mark.parametrize("heads", HEADS)
def test_save_load_roundtrip(tmp_path, heads):
    m = small_model(**heads)
    save_model(tmp_path / "model.safetensors", m, {"n_codes": 20, "n_classes": 1, "tokens_per_field": 17})
    loaded, meta = load_model(tmp_path / "model.safetensors")
    assert meta["config"]["n_embd"] == 24 and meta["n_codes"] == 20
    assert loaded.config.n_kv_head == heads.get("n_kv_head", heads["n_head"])
    idx = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], m(idx)[0], atol=0, rtol=0)


def test_value_features_embed_code_values_and_only_code_values():
    m = small_model(value_features=value_feature_width(2))
    codebooks = torch.tensor([[[0.5, -1.0], [0.5, -1.0], [-0.25, 2.0]], [[0.01, 0.0], [0.0, 0.02], [0.0, 0.0]]])
    m.set_code_values(codebooks)  # 2 levels of 3 codes of 2 weights: ids 0-5 are codes, 6-22 special
    f = m.code_features
    assert f.shape == (23, 18) and torch.equal(f[6:], torch.zeros(17, 18))
    assert torch.equal(f[0], f[1]) and not torch.equal(f[0], f[2])  # equal codes, equal features
    # each level is scaled by its own largest magnitude: the small residual level still spans [-1, 1]
    torch.testing.assert_close(f[:6, :2], torch.tensor([[1.0, -0.5], [1.0, -0.5], [-0.5, 1.0],
                                                        [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(f[:3], code_value_features(codebooks[0]))
    with torch.no_grad():  # a code token's embedding is its id's plus the projection of its features
        x = m.embed(torch.tensor([[0, 1, 7]]), torch.arange(3))
        base = m.transformer.wte(torch.tensor([[0, 1, 7]])) + m.transformer.wpe(torch.arange(3))
        torch.testing.assert_close(x - base, m.transformer.wve(f[[0, 1, 7]])[None])
        assert torch.equal((x - base)[0, 2], torch.zeros(24))
    with pytest.raises(ValueError, match="do not fit"):
        m.set_code_values(torch.randn(1, 5, 3))  # wrong group
    with pytest.raises(ValueError, match="do not fit"):
        small_model().set_code_values(codebooks)  # a model without value features


def test_class_embedding_reaches_every_position():
    """Sequences that differ only in their conditioning token (position 1): with class_embed even position 0's
    logits differ (the class is added to every input), without it position 0 cannot see position 1."""
    idx = torch.randint(0, 20, (2, 9))
    idx[:, 0], idx[0, 1], idx[1, 1] = 20, 21, 22
    for class_embed in (False, True):
        m = small_model(class_embed=class_embed)
        with torch.no_grad():
            logits, _ = m(idx)
        assert torch.equal(logits[0, 0], logits[1, 0]) != class_embed
        assert not torch.equal(logits[0, 2:], logits[1, 2:])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        small_model(class_embed=True)(idx[:, :1])


def test_weight_roles_are_embedded_at_the_position_that_predicts_the_weight():
    """Position p predicts t_p, so it gets the role of token p - 1; position 0 (it predicts the class) none."""
    m = small_model(role_nodes=4)
    roles = torch.randint(0, 4, (18, 2))
    m.set_roles(roles)
    pos = torch.arange(19)
    idx = torch.randint(0, 23, (1, 19))
    tr = m.transformer
    base = tr.wte(idx) + tr.wpe(pos)
    want = base + torch.cat([(tr.wse.weight[4] + tr.wde.weight[4])[None], tr.wse(roles[:, 0]) + tr.wde(roles[:, 1])])
    torch.testing.assert_close(m.embed(idx, pos), want)
    for bad in (torch.zeros(17, 2, dtype=torch.long), torch.full((18, 2), 4)):
        with pytest.raises(ValueError, match="do not fit"):
            m.set_roles(bad)


def test_checkpoint_from_before_grouped_attention_loads(tmp_path):
    m = small_model()
    config = {"vocab_size": 23, "block_size": 19, "n_layer": 2, "n_head": 3, "n_embd": 24, "bias": True}
    save_artifact(tmp_path / "old.safetensors", "model", dict(m.state_dict()), {"config": config})  # no n_kv_head
    loaded, _ = load_model(tmp_path / "old.safetensors")
    assert loaded.config.n_kv_head == 3


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(NfgenError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    m = small_model()
    sd = dict(m.state_dict())
    save_artifact(tmp_path / "noconf.safetensors", "model", sd, {})
    with pytest.raises(NfgenError, match="config"):
        load_model(tmp_path / "noconf.safetensors")
    save_artifact(tmp_path / "wrong.safetensors", "model", sd, {"config": {"vocab_size": 23, "block_size": 19,
                                                                             "n_layer": 3, "n_head": 3, "n_embd": 24}})
    with pytest.raises(NfgenError, match="does not match"):
        load_model(tmp_path / "wrong.safetensors")
    sd["lm_head.weight"] = torch.full_like(sd["lm_head.weight"], float("nan"))
    save_model(tmp_path / "nan.safetensors", m, {})
    save_artifact(tmp_path / "nan.safetensors", "model", sd, {"config": {"vocab_size": 23, "block_size": 19,
                                                                           "n_layer": 2, "n_head": 3, "n_embd": 24,
                                                                           "bias": True}})
    with pytest.raises(NfgenError, match="NaN"):
        load_model(tmp_path / "nan.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x08\x00garbage")
    with pytest.raises(NfgenError):
        load_model(tmp_path / "trunc.safetensors")


@pytest.mark.parametrize("field,value,message", [
    ("n_head", 0, "n_head 0 must be an integer ≥ 1"), ("n_embd", 0, "n_embd 0 must be an integer ≥ 1"),
    ("n_layer", -1, "n_layer -1 must be an integer ≥ 1"), ("dropout", 2.0, r"dropout 2.0 must be in \[0, 1\)"),
    ("vocab_size", "23", "vocab_size '23' must be an integer"), ("n_kv_head", 2, "n_kv_head 2 must divide n_head 3"),
    ("value_features", -3, "value_features -3 must be an integer ≥ 0"), ("bias", "yes", "bias 'yes' must be true")])
def test_load_refuses_an_invalid_config(tmp_path, field, value, message):
    config = {"vocab_size": 23, "block_size": 19, "n_layer": 2, "n_head": 3, "n_embd": 24, "bias": True}
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**config, field: value})
    path = tmp_path / "model.safetensors"
    save_artifact(path, "model", dict(small_model().state_dict()), {"config": {**config, field: value}})
    with pytest.raises(NfgenError, match=f"{path} holds an invalid model config \\({message}.*\\); retrain it "
                                         "with nfgen train"):
        load_model(path)
