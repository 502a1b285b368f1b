import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The flag is read
# when a kernel is defined, so it must be set before nfkernels' Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
# Absolute, because some tests run the CLI in subprocesses with another working directory.
os.environ["NFGEN_DATA"] = str(Path(os.environ.get("NFGEN_DATA", ROOT.parent / "shared" / "data")).resolve())


def _mnist_available() -> bool:
    root = Path(os.environ["NFGEN_DATA"])
    return (root / "mnist" / "t10k-images-idx3-ubyte.gz").exists() or (root / "mnist" / "t10k-images-idx3-ubyte").exists()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not _mnist_available():
        pytest.fail(f"MNIST not found under NFGEN_DATA={os.environ['NFGEN_DATA']}; point NFGEN_DATA at shared/data")
    return Path(os.environ["NFGEN_DATA"])


@pytest.fixture(scope="session")
def cifar_data_root() -> Path:
    """NFGEN_DATA holding the CIFAR-10 test set as an image folder (shared/data/cifar10/test/<class>/*.png)."""
    root = Path(os.environ["NFGEN_DATA"])
    if not (root / "cifar10" / "test").is_dir():
        pytest.fail(f"CIFAR-10 not found under NFGEN_DATA={root}/cifar10/test; point NFGEN_DATA at shared/data")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (as torchrun gives each rank): the tiny models are dominated by per-op overhead,
    and on a busy 2-core machine two spinning OpenMP threads made them several times slower (seen in
    test_train: 6-36 s against ~3 s). Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def die_at_step(monkeypatch):
    """arm(n): nfgen.train's n-th optimizer step raises KeyboardInterrupt — a kill at a known point.

    Undo with monkeypatch.undo().
    """
    import nfgen.train as train_mod

    def arm(n: int) -> None:
        real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

        def clip_then_die(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_clip(*a, **k)

        monkeypatch.setattr(train_mod.torch.nn.utils, "clip_grad_norm_", clip_then_die)

    return arm


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory):
    """A tokens file of 64 tiny 2→4→1 fields in two classes whose weights differ in sign: a pattern a GPT
    must learn to condition on, in 17-token sequences (training tests stay fast)."""
    from nfgen.tokenizer import TokenizerConfig, TokenSet, WeightTokenizer, save_tokens
    from nfkernels import SirenSpec

    spec = SirenSpec(hidden=4, hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    base = torch.linspace(-1, 1, spec.num_params)
    weights = (base * (2 * labels[:, None] - 1) + 0.05 * torch.randn(64, spec.num_params, generator=g)).float()
    tok = WeightTokenizer.fit(weights, spec, TokenizerConfig(codebook_size=16, iters=5, quiet=True))
    path = tmp_path_factory.mktemp("tokens") / "tokens.safetensors"
    save_tokens(path, TokenSet(tok.encode(weights), labels, tok, spec, (1, 1), {"n_classes": 2}))
    return path


@pytest.fixture
def tiny_demo(monkeypatch):
    """`nfgen.demo`'s sizes shrunk to seconds (120 fields of a 33-weight SIREN, a one-layer GPT for 6 steps); its
    recipe (template, class-pca tokens, expected-from-32 sampling) unchanged. Returns the module."""
    from nfgen import demo
    monkeypatch.setattr(demo, "TRAIN_SPLIT", "mnist:test[:120]")
    monkeypatch.setattr(demo, "REF_SPLIT", "mnist:test[8000:8040]")
    monkeypatch.setattr(demo, "CLASSIFIER_SPLIT", "mnist:test[:300]")
    monkeypatch.setattr(demo, "HELDOUT_SPLIT", "mnist:test[9000:9100]")
    monkeypatch.setattr(demo, "FIT", dict(hidden=8, hidden_layers=1, steps=20, lr=1e-3))
    monkeypatch.setattr(demo, "TEMPLATE", dict(outer=3, batch=16, inner_steps=4))
    monkeypatch.setattr(demo, "TRAIN", {**demo.TRAIN, "n_layer": 1, "n_head": 2, "n_embd": 32, "steps": 6,
                                        "eval_every": 3})
    monkeypatch.setattr(demo, "PER_CLASS", 2)
    monkeypatch.setattr(demo, "UNCONDITIONAL", 4)
    return demo
