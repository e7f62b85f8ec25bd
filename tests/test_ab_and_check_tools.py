"""The A/B of two kernel builds (``tools/ab_kernels.py``) and the GPU correctness check
(``tools/check_kernels.py``): what they take as the base, and how they stop and say where when a
run does not finish."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def test_ab_kernels_base_tree_takes_the_base_kernel_sources(tmp_path):
    """tools/ab_kernels.py: the base copy holds the base commit's (or directory's) kernel
    sources and this tree's Python; a base without them, or one this tree's native.py and
    layout could not call (other entry points, another layout), is refused in one line."""
    import ab_kernels

    root = Path(__file__).resolve().parent.parent
    names = ab_kernels.kernel_sources(root)
    want = {"fragments.cuh", "mixed_mma.cu", "mixed_mmv.cu", "mixed_wg.cu"}
    assert {n.name for n in names} == want
    # a commit of a repository whose working tree has moved on since
    repo = tmp_path / "repo"
    (repo / ab_kernels.KERNELS).mkdir(parents=True)
    entry = 'extern "C" int gq_f(const void* x,\n int n)'
    for n in names:
        (repo / n).write_text(f"// committed {n.name}\n{entry}\n")
    (repo / ab_kernels.LAYOUT).write_text("# layout\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]

    def commit(message):
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()

    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    first = commit("base")
    for n in names:  # the same entry points, laid out otherwise
        (repo / n).write_text('// changed since\nextern "C" int gq_f(const void* x, int n)\n')
    got, label = ab_kernels.base_sources("HEAD", repo)
    assert got == {n: f"// committed {n.name}\n{entry}\n".encode() for n in names}
    assert label == first
    with pytest.raises(ValueError, match="git has no"):
        ab_kernels.base_sources("no-such-commit", repo)
    (repo / names[0]).write_text('extern "C" int gq_f(const void* x, int n, int m)\n')
    with pytest.raises(ValueError, match=f"{names[0].name}'s extern .C. entry points differ"):
        ab_kernels.base_sources(first, repo)
    (repo / names[0]).write_text(entry + "\n")
    (repo / ab_kernels.LAYOUT).write_text("# another layout\n")
    with pytest.raises(ValueError, match="packed layout"):
        ab_kernels.base_sources(first, repo)
    # a directory of sources, then the copy of this tree with them in place
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        (src / n.name).write_bytes((root / n).read_bytes())
    (src / "mixed_wg.cu").write_text(
        "// the base's warpgroup kernel\n"
        + "\n".join(
            ab_kernels.entry_points((root / ab_kernels.KERNELS / "mixed_wg.cu").read_text())
        )
    )
    got, label = ab_kernels.base_sources(str(src), root)
    # recorded by its name (outside the tree) and a digest: no machine's path in the results
    assert label.startswith("src (sources sha256 ") and str(tmp_path) not in label
    tree = ab_kernels.base_tree(got, tmp_path / "base", root)
    cuda = tree / ab_kernels.KERNELS
    assert (cuda / "mixed_wg.cu").read_text().startswith("// the base's warpgroup kernel\n")
    here = root / ab_kernels.KERNELS
    assert (cuda / "mixed_mma.cu").read_bytes() == (here / "mixed_mma.cu").read_bytes()
    for py in ("gift_quant/kernels/triton/routes.py", "tools/bench_kernels.py", "pyproject.toml"):
        assert (tree / py).read_bytes() == (root / py).read_bytes()
    (src / "mixed_mmv.cu").unlink()
    with pytest.raises(ValueError, match="no mixed_mmv.cu there"):
        ab_kernels.base_sources(str(src), root)


def test_ab_kernels_whole_tree_takes_the_base_commit_python_and_all(tmp_path):
    """tools/ab_kernels.py --whole-tree (a change of the packed layout): the base is the base
    commit's own gift_quant, tools and pyproject.toml, not this tree's Python with its kernels;
    or a directory holding them, used in place and labelled by a digest of its files; a base
    that is neither is refused in one line."""
    import ab_kernels

    repo = tmp_path / "repo"
    files = {"gift_quant/kernels/cuda/layout.py": "# base layout\n", "tools/t.py": "# tool\n"}
    files["pyproject.toml"] = "[project]\n"
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    (repo / "README.md").write_text("not taken\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=repo, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    (repo / "gift_quant/kernels/cuda/layout.py").write_text("# moved on since\n")
    tree, label, commit = ab_kernels.whole_tree("HEAD", tmp_path / "base", repo)
    assert (label, commit) == (sha, sha)
    assert {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()} == set(files)
    assert (tree / "gift_quant/kernels/cuda/layout.py").read_text() == "# base layout\n"
    with pytest.raises(ValueError, match="not a commit of this repository"):
        ab_kernels.whole_tree("no-such-commit", tmp_path / "other", repo)
    # a directory, in place: its digest follows its files
    tree, label, commit = ab_kernels.whole_tree(str(repo), tmp_path / "unused", repo)
    assert tree == repo.resolve() and "tree sha256" in label and label in commit
    assert label.startswith(". (tree sha256 ")  # the tree's own root, not its path
    (repo / "tools/t.py").write_text("# another tool\n")
    assert ab_kernels.whole_tree(str(repo), tmp_path / "unused", repo)[1] != label
    (repo / "pyproject.toml").unlink()
    with pytest.raises(ValueError, match="no pyproject.toml there"):
        ab_kernels.whole_tree(str(repo), tmp_path / "unused", repo)


def test_ab_kernels_stops_a_side_past_its_limit_and_names_its_last_line(tmp_path, capsys):
    """tools/ab_kernels.py's ``run_side``: a side's lines pass through as they come; one that
    runs past ``--side-limit`` is stopped, and one that fails ends the A/B, each in one line
    naming the side and the last line it printed (a kernel that never finishes holds its
    process: round 41's A/B runs were cut by the device's limit with no word of where)."""
    import os
    import time

    import ab_kernels

    env = dict(os.environ)
    hang = "print('cand wg:64x2x6c6 12.25us', flush=True)\nimport time\ntime.sleep(60)"
    t0 = time.time()
    with pytest.raises(SystemExit) as stopped:
        ab_kernels.run_side("new", [sys.executable, "-c", hang], tmp_path, env, 3.0)
    assert time.time() - t0 < 30
    msg = str(stopped.value)
    assert "the new build's timing ran past --side-limit 3 s" in msg
    assert msg.endswith("its last line: cand wg:64x2x6c6 12.25us")
    fail = "print('timing 4096x4096', flush=True)\nraise SystemExit(3)"
    with pytest.raises(
        SystemExit, match=r"base build's timing failed \(exit 3\).*timing 4096x4096"
    ):
        ab_kernels.run_side("base", [sys.executable, "-c", fail], tmp_path, env, None)
    ab_kernels.run_side("base", [sys.executable, "-c", "print('done')"], tmp_path, env, 5.0)
    assert "done" in capsys.readouterr().out
    run = subprocess.run(
        [sys.executable, "tools/ab_kernels.py", "--base", "HEAD", "--side-limit", "0"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--side-limit 0: give a positive number of seconds" in run.stderr


def test_check_kernels_names_the_kernel_a_late_case_is_running(tmp_path, monkeypatch):
    """tools/check_kernels.py: each worker notes the kernel case it is running in a file of its
    own (cleared when its case is done); past ``--limit`` the check lists the notes left, the
    longest running first, so a kernel that never finishes is named; a limit that is not a
    positive number of seconds is refused before any work."""
    import os
    import time

    import check_kernels

    monkeypatch.setenv(check_kernels.PROGRESS, str(tmp_path))
    check_kernels.note_progress("W4 fp16 4096x4096 M=32 candidate wg:64x2x6c6")
    mine = tmp_path / f"{os.getpid()}.txt"
    assert mine.read_text().split(" ", 1)[1] == "W4 fp16 4096x4096 M=32 candidate wg:64x2x6c6\n"
    check_kernels.note_progress(None)  # the case done
    assert not mine.exists() and check_kernels.stuck(tmp_path, time.time()) == []
    now = time.time()
    (tmp_path / "101.txt").write_text(
        f"{now - 5:.3f} W3 bf16 1536x960 M=8 routed (the op's route)\n"
    )
    (tmp_path / "102.txt").write_text(f"{now - 400:.3f} W4 fp16 4096x4096 M=32 candidate x\n")
    assert check_kernels.stuck(tmp_path, now) == [
        "W4 fp16 4096x4096 M=32 candidate x (running 400 s)",
        "W3 bf16 1536x960 M=8 routed (the op's route) (running 5 s)",
    ]
    monkeypatch.delenv(check_kernels.PROGRESS)
    check_kernels.note_progress("outside a check: nowhere to write")  # no error, no file
    run = subprocess.run(
        [sys.executable, "tools/check_kernels.py", "--limit", "-3"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--limit -3: give a positive number of seconds" in run.stderr
