"""benchmarks._env: what a results file records about the code that produced it."""
import re
import subprocess
from pathlib import Path

from benchmarks._env import git_commit


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_commit_marks_a_dirty_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("NFGEN_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = git_commit(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "untracked.txt").write_text("results\n")  # untracked files do not change the code
    assert git_commit(str(tmp_path)) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == clean + "+dirty"
    monkeypatch.setenv("NFGEN_COMMIT", "abc1234")  # a tree copied without .git names its commit
    assert git_commit(str(tmp_path)) == "abc1234"
    assert git_commit(str(tmp_path / "nowhere")) == "abc1234"


def test_git_commit_outside_a_repository_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv("NFGEN_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(str(tmp_path)) is None


def test_gpu_session_refuses_unknown_parts_before_building(tmp_path):
    # a misspelt part must fail at once, not after a machine start and a CUDA build
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    for args in (["test", "quality_ablations"], []):
        done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, timeout=30)
        assert done.returncode == 2 and "gpu_session.sh:" in done.stderr, (args, done.stderr)
        assert not (tmp_path / "out").exists()  # nothing started: no log, no build
