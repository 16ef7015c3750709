"""The documentation people read stays true: README.md is short and names the real commands,
config/README.md is what tools/config_docs.py writes from the schema, every relative link points to
a file (and heading) that exists, the file tree of docs/design.md is the real one, and every code
example in docs/*.md runs.

Executed examples: every fenced block tagged ``python`` (run with this interpreter), ``sh``,
``bash`` or ``console`` (run with bash, ``set -euo pipefail``; in a ``console`` block only the
``$ `` lines). Each runs in a fresh copy of the repository (no results, no .git; ``.venv`` links to
this interpreter's environment, whose ``bin`` comes first on PATH), with the Hugging Face hubs set
offline. Blocks that cannot run here (the hub, a GPU, a cluster) are tagged ``text``.

An HTML comment on the line just before a block sets options for it:
``<!-- doc-test: continue -->`` runs the block in the folder of the previous executed block of the
same file, after it (the two are one test); ``<!-- doc-test: timeout=300 -->`` raises the time
limit (default 180 s); ``<!-- doc-test: xfail=known_bug_in_x -->`` expects the example to fail (a
known bug; strict, so the test fails once the bug is fixed and the mark must go);
``<!-- doc-test: file-tree -->`` marks the layout block of docs/design.md.
The examples carry the ``slow`` mark, those that call ``snakemake`` the ``workflow`` mark instead
(``make test-fast`` runs neither); the README, link and layout checks are unit tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
EXECUTED = {"python", "sh", "bash", "console"}
DEFAULT_TIMEOUT = 180
# what a copy of the repository leaves out (outputs, caches, the environment, git)
NOT_COPIED = {".git", ".venv", "results", "build", "dist", ".snakemake", ".pytest_cache", ".ruff_cache", "__pycache__"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
OPTIONS = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the doc-test options just before it."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        options = {}
        j = i - 1
        if j >= 0 and OPTIONS.match(lines[j]):
            for item in OPTIONS.match(lines[j]).group(1).split():
                key, _, value = item.partition("=")
                options[key] = value or True
        body = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            body.append(lines[i])
            i += 1
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", options))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def example_groups() -> list[list[Block]]:
    """The executed blocks, a block marked ``continue`` joined to the group before it."""
    groups: list[list[Block]] = []
    for path in doc_files():
        last = None
        for b in fenced_blocks(path):
            if b.lang not in EXECUTED:
                continue
            if b.options.get("continue"):
                assert last is not None, f"{b.where}: 'continue' needs an executed block before it in the file"
                last.append(b)
            else:
                last = [b]
                groups.append(last)
    return groups


def _param(group: list[Block]):
    # every example is a subprocess taking seconds: slow; one that runs snakemake: workflow
    marks = [pytest.mark.workflow if any(re.search(r"\bsnakemake\b", b.code) for b in group) else pytest.mark.slow]
    reasons = [b.options["xfail"] for b in group if b.options.get("xfail")]
    if reasons:  # a known bug, named in the doc: the test fails loudly once it is fixed (strict)
        marks.append(pytest.mark.xfail(reason=" ".join(map(str, reasons)).replace("_", " "), strict=True))
    return pytest.param(group, id=group[0].where, marks=marks)


def copy_repo(dst: Path) -> Path:
    """The repository's files without outputs, caches and git; ``.venv`` -> this environment."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in NOT_COPIED or entry.name.endswith(".egg-info"):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst / entry.name)
        elif entry.is_dir():
            shutil.copytree(
                entry,
                dst / entry.name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake"),
            )
        else:
            shutil.copy2(entry, dst / entry.name)
    if sys.prefix != sys.base_prefix:
        os.symlink(sys.prefix, dst / ".venv")
    return dst


def example_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = "1"
    env.pop("PYTHONPATH", None)
    env["MPLBACKEND"] = "Agg"
    return env


def console_commands(code: str) -> str:
    """The ``$ `` lines of a console block (with their ``\\`` continuation lines)."""
    out, cont = [], False
    for line in code.splitlines():
        if line.startswith("$ ") or cont:
            out.append(line[2:] if line.startswith("$ ") and not cont else line)
            cont = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def run_block(block: Block, cwd: Path, env: dict) -> None:
    timeout = int(block.options.get("timeout", DEFAULT_TIMEOUT))
    script = cwd / f".doc_example_{block.line}"
    if block.lang == "python":
        script = script.with_suffix(".py")
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        code = console_commands(block.code) if block.lang == "console" else block.code
        script = script.with_suffix(".sh")
        script.write_text("set -euo pipefail\n" + code)
        cmd = ["bash", str(script)]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.where}: the {block.lang} example ran past {timeout} s\n{e.stdout or ''}{e.stderr or ''}")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{block.where}: the {block.lang} example exited {proc.returncode}:\n{tail}")


@pytest.mark.parametrize("group", [_param(g) for g in example_groups()])
def test_doc_example_runs(group, tmp_path):
    cwd = copy_repo(tmp_path / "repo")
    env = example_env()
    for block in group:
        run_block(block, cwd, env)


# --- README ---------------------------------------------------------------------------------------
def test_readme_is_short_and_its_commands_are_the_makefile_targets():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, f"README.md has {len(text.splitlines())} lines; keep it at most 150"
    quick = [b for b in fenced_blocks(README) if re.search(r"^\s*make\s", b.code, re.M)]
    assert quick, "README.md: no block with the quick-start commands"
    commands = [line.split("#")[0].strip() for b in quick for line in b.code.splitlines() if line.strip()]
    assert commands == ["make run", "make test"], commands
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    assert {"run", "test"} <= targets


# --- config/README.md -----------------------------------------------------------------------------
@pytest.mark.slow
def test_config_reference_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "config_docs.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_config_reference_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "config" / "README.md").read_text().replace("| `split.seed` |", "| `split.sead` |"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "config_docs.py"), "--check", "--output", str(stale)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "stale" in proc.stderr


def test_config_reference_names_every_schema_key():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import config_docs
    finally:
        sys.path.remove(str(ROOT / "tools"))
    paths = config_docs.documented_paths()
    assert {"study", "finetune.lr", "merge_eval.tune.budget", "mixture.sample.size", "models.<name>.hub"} <= set(paths)
    text = (ROOT / "config" / "README.md").read_text()
    headings = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    missing = [p for p in paths if f"| `{p}` |" not in text and f"| [`{p}`](" not in text and f"`{p}`" not in headings]
    assert not missing, f"config/README.md has no row or section for {missing}"


# --- links ----------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    in_code = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            for target in LINK.findall(line):
                yield n, target


MARKDOWN_FILES = [README, ROOT / "config" / "README.md", *doc_files()]


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"line {n}: {target} (no {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"line {n}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_docs_exist_and_readme_links_them():
    assert doc_files(), "docs/*.md missing"
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    unlinked = [p.name for p in doc_files() if p.resolve() not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


# --- the layout of docs/design.md -----------------------------------------------------------------
def test_design_file_tree_is_the_real_one():
    trees = [b for b in fenced_blocks(DOCS / "design.md") if b.options.get("file-tree")]
    assert len(trees) == 1, "docs/design.md: mark its layout block with <!-- doc-test: file-tree -->"
    # each line: names (one space apart) relative to the last less indented folder line, then two or
    # more spaces and a description
    listed, stack = set(), []
    for line in trees[0].code.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        names = re.split(r"\s{2,}", line.strip())[0].split()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        base = stack[-1][1] if stack else ""
        listed.update(f"{base}{name}".rstrip("/") for name in names)
        if names[0].endswith("/"):
            stack.append((indent, f"{base}{names[0]}"))
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"docs/design.md lists paths that do not exist: {missing}"
    pkg = ROOT / "src" / "mergemix"
    modules = {
        f"src/mergemix/{p.name}"
        for p in pkg.iterdir()
        if (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    unlisted = sorted(modules - listed)
    assert not unlisted, f"docs/design.md's layout lacks {unlisted}"
