"""No file of the repository cites a file that is not in the repository.

A citation is one of three things, matched exactly (anything else is prose, not a citation):
1. A repository path: a token that starts with one of the repository's own top-level folders (the first part of
   the paths git lists: docs, cipo_nemo, benchmarks, conf, tests, slurm, scripts, ...) or with one of the team
   workshop's folders, which are never in the repository (WORKSHOP_FOLDERS), and that follows nothing path-like: an
   absolute path (`/work/x/docs/...`), a home path (`~/.cache/cipo_nemo/...`), a URL or an f-string's `{root}/docs`
   are not citations of this repository.
2. A Markdown link `[text](target)` in a .md file: the target, resolved against the file's folder (URLs, e-mail
   addresses and in-page anchors aside).
3. A bare Markdown file name (`architecture.md`) in prose (every text file but Python, and Python's comments and
   docstrings: a string literal in code names a file the code writes): some file of that name must be in the
   repository.
4. In the same prose, the name of one of the team workshop's documents with or without its extension ("DESIGN step
   5", "PLATFORM.md"): they are not in the repository, their content is (docs/design.md, docs/platform.md).

A cited path resolves when it is a file or folder of this checkout that git tracks or would track (untracked but not
ignored). A path git ignores is a run's output (results/, benchmarks/.venv-trl), written by the code that cites it.
Where a path runs into a placeholder (`{name}`, `<N>`, `*`, `$VAR`) or has one as a part (a single capital letter:
`conf/X.yaml`, `step_N`), only the folder before it must exist.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".ini", ".j2", ".jinja"}
TEXT_NAMES = {"Dockerfile", "run"}  # .ci/run
WORKSHOP_FOLDERS = ("shared", "reference")  # the team's workshop outside the repository: a citation of it is a bug
WORKSHOP_DOCUMENTS = re.compile(r"\b(DESIGN|PLATFORM)\b")  # shared/DESIGN.md, shared/PLATFORM.md
PLACEHOLDER_START = set("{<*[$")
PLACEHOLDER_PART = re.compile(r"(^|_)[A-Z](\.\w+)?$")  # X.yaml, step_N: a name the reader fills in
# path -> why its citations are not checked (keep this short)
ALLOWED = {
    "tests/unit/test_citations.py": "the rule's own examples of citations that must fail",
}


def git_paths(*args: str) -> list[str]:
    completed = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the citation check reads the file list from git, which failed in {REPO}: "
                           f"git {' '.join(args)}: {completed.stderr.strip()}")
    return [line for line in completed.stdout.split("\0") if line]


@cache
def repository_files() -> frozenset[str]:
    """Tracked files and untracked ones git would track (a file added but not yet committed is in)."""
    return frozenset(git_paths("ls-files", "-z", "--cached", "--others", "--exclude-standard"))


@cache
def repository_folders() -> frozenset[str]:
    return frozenset(str(parent) for path in repository_files() for parent in Path(path).parents if str(parent) != ".")


def root_folders() -> tuple[str, ...]:
    return tuple(sorted({path.split("/", 1)[0] for path in repository_files() if "/" in path} | set(WORKSHOP_FOLDERS)))


def citation_pattern(roots: tuple[str, ...]) -> re.Pattern[str]:
    # not after a path character, a home or variable sign, or an f-string brace: then the path is not ours
    return re.compile(r"(?<![\w./~$@{}-])((?:" + "|".join(map(re.escape, roots)) + r")/[\w./-]*)")


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
BARE_MARKDOWN_NAME = re.compile(r"(?<![\w./-])([\w-]+\.md)(?![\w/-]|\.\w)")


def repository_paths_cited(text: str, roots: tuple[str, ...]) -> list[str]:
    """Rule 1: repository paths in `text`; a path that runs into a placeholder is cut back to its folder."""
    cited = []
    for match in citation_pattern(roots).finditer(text):
        path = match.group(1).rstrip(".")
        if text[match.end():match.end() + 1] in PLACEHOLDER_START and not path.endswith("/"):
            path = path.rsplit("/", 1)[0]
        parts = path.rstrip("/").split("/")
        filled = [part for part in parts if PLACEHOLDER_PART.search(part)]
        cited.append("/".join(parts[:parts.index(filled[0])] if filled else parts))
    return cited


def prose(path: str, text: str) -> str:
    """The text rule 3 reads: a Python file's comments and docstrings, any other file whole."""
    if not path.endswith(".py"):
        return text
    comments = [token.string for token in tokenize.generate_tokens(io.StringIO(text).readline)
                if token.type == tokenize.COMMENT]
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(text)) if isinstance(node, nodes)]
    return "\n".join(comments + docstrings)


def markdown_links(text: str, folder: str) -> list[str]:
    """Rule 2: Markdown link targets, resolved against `folder` (relative to the repository root)."""
    links = []
    for target in MARKDOWN_LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        target = target.split("#", 1)[0]
        resolved = (REPO / folder / target).resolve()
        links.append(str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved))
    return links


def is_in_repository(path: str) -> bool:
    if path in repository_files() or path in repository_folders():
        return True
    on_disk = (REPO / path).resolve()  # a path through a tracked link (cipo_nemo/conf -> conf)
    if on_disk.exists() and on_disk.is_relative_to(REPO):
        inside = str(on_disk.relative_to(REPO))
        return inside in repository_files() or inside in repository_folders()
    return False


def ignored_by_git(paths: set[str]) -> set[str]:
    """The paths (or those paths as folders) that .gitignore covers: outputs, not citations."""
    if not paths:
        return set()
    return {path for path in paths if _ignored(path) or _ignored(f"{path}/")}


def _ignored(path: str) -> bool:
    # one path per call: git check-ignore stops at the first path it refuses (one beyond a symbolic link, e.g.
    # benchmarks/.venv-trl/bin/python/...) and would leave the rest of a batch unanswered
    completed = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], capture_output=True, check=False)
    return completed.returncode == 0


def scanned_files() -> list[str]:
    return sorted(path for path in repository_files()
                  if (Path(path).suffix in TEXT_SUFFIXES or Path(path).name in TEXT_NAMES)
                  and path not in ALLOWED and (REPO / path).is_file() and not (REPO / path).is_symlink())


def unresolved_citations() -> list[str]:
    roots = root_folders()
    basenames = {Path(path).name for path in repository_files()}
    found: dict[str, list[str]] = {}  # cited path -> where
    for path in scanned_files():
        text = (REPO / path).read_text(errors="replace")
        cited = repository_paths_cited(text, roots)
        if path.endswith(".md"):
            cited += markdown_links(text, str(Path(path).parent))
        for target in cited:
            if not is_in_repository(target):
                found.setdefault(target, []).append(path)
        for name in BARE_MARKDOWN_NAME.findall(prose(path, text)):
            if name not in basenames:
                found.setdefault(name, []).append(path)
        for name in WORKSHOP_DOCUMENTS.findall(prose(path, text)):
            found.setdefault(f"the workshop's {name}", []).append(path)
    missing = set(found) - ignored_by_git({target for target in found if "/" in target})
    return [f"{target} (cited in {', '.join(sorted(set(found[target])))})" for target in sorted(missing)]


def test_every_cited_file_is_in_the_repository() -> None:
    assert unresolved_citations() == []


def test_allowed_files_exist() -> None:
    assert [path for path in ALLOWED if path not in repository_files()] == []


ROOTS = ("benchmarks", "docs", "shared")


@pytest.mark.parametrize(("text", "cited"), [
    ("see docs/design.md.", ["docs/design.md"]),  # the full stop ends the sentence, not the path
    ("`benchmarks/speed/step_speed.py --quick`", ["benchmarks/speed/step_speed.py"]),
    ("python benchmarks/<kind>/<script>.py", ["benchmarks"]),  # a placeholder: only the folder before it
    ('f"docs/results/study_{name}.md"', ["docs/results"]),
    ("(docs/launching.md#installing)", ["docs/launching.md"]),
    ("facts in shared/PLATFORM.md", ["shared/PLATFORM.md"]),
    ("--config docs/X.yaml; docs/runs/step_N/a.md", ["docs", "docs/runs"]),  # a name the reader fills in
    ("/work/main/docs/design.md ~/.cache/docs/x $PWD/docs/y {root}/docs/z results/docs/w", []),  # not ours
    ("https://github.com/x/y/blob/main/docs/guide.md", []),
])
def test_what_counts_as_a_repository_path(text: str, cited: list[str]) -> None:
    assert repository_paths_cited(text, ROOTS) == cited


def test_markdown_links_resolve_against_their_folder() -> None:
    text = "[a](../results/x.md) [b](launching.md#logs) [c](https://example.com/a.md) [d](#top)"
    assert markdown_links(text, "docs/notes") == ["docs/results/x.md", "docs/notes/launching.md"]


def test_bare_markdown_names_are_matched_alone() -> None:
    assert BARE_MARKDOWN_NAME.findall("see DESIGN.md and docs/x.md, `platform.md`; x.md.bak") == ["DESIGN.md",
                                                                                                 "platform.md"]


def test_prose_of_python_is_its_comments_and_docstrings() -> None:
    source = '"""Module: see design.md."""\nOUT = "report.md"  # written next to notes.md\n'
    assert BARE_MARKDOWN_NAME.findall(prose("x.py", source)) == ["notes.md", "design.md"]
    assert BARE_MARKDOWN_NAME.findall(prose("x.md", source)) == ["design.md", "report.md", "notes.md"]


def test_workshop_documents_are_found_by_name() -> None:
    assert WORKSHOP_DOCUMENTS.findall("(DESIGN step 5) and PLATFORM.md; not DESIGNED or design.md") == ["DESIGN",
                                                                                                    "PLATFORM"]


def test_a_missing_citation_is_found_and_an_ignored_output_is_not(tmp_path: Path) -> None:
    assert not is_in_repository("docs/no_such_file.md")
    assert not is_in_repository("shared/PLATFORM.md")
    assert is_in_repository("docs") and is_in_repository("cipo_nemo/conf/cipo_base.yaml")  # through the link
    assert ignored_by_git({"results/run_1/metrics.jsonl", "docs/no_such_file.md"}) == {"results/run_1/metrics.jsonl"}
