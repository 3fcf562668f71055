"""The corrections study's pre-registration: written and committed before any unit runs, checked by every unit
and by the report.

`registration.json` (in the results directory) holds the design, each arm's config hash, the claims with the
comparison each one is, the verdict rules, the power calculation, and the git blob hashes of the analysis code
(ANALYSIS_MODULES: `git hash-object` of each file prints the same).
Git is the witness that it came first:
- a unit runs only when the registration is committed and unchanged in the working tree, and the design and the
  arms' configs hash as registered; it records the commit it ran at (`code_commit`);
- the report checks that the latest commit touching the registration is an ancestor of every unit's
  `code_commit` and of the commit that added the unit's results (and is not that commit), and whether the analysis
  module still has its registered blob hash.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.studies.corrections import analysis
from benchmarks.studies.corrections.design import Design, changed_keys, registered_configs, registered_fingerprints

REGISTRATION_FILE = "registration.json"
DONE_FILE = "done.json"
# The code that turns results into verdicts: the analysis, the report that feeds it the accepted units, and the
# check (here) that decides which units are accepted. Their git blob hashes are registered.
ANALYSIS_MODULES = tuple(Path(analysis.__file__).with_name(name) for name in ("analysis.py", "report.py",
                                                                              "registration.py"))


# ---------------------------------------------------------------------------------------------- git


def git(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=False)


def repository_of(path: Path) -> Path | None:
    """The top of the git work tree holding `path` (None: not in one)."""
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    result = git(probe, "rev-parse", "--show-toplevel")
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def head_commit(path: Path) -> str | None:
    result = git(path if path.is_dir() else path.parent, "rev-parse", "HEAD")
    return result.stdout.strip() if result.returncode == 0 else None


def tree_changed(results_dir: Path) -> bool | None:
    """Whether tracked files outside the results directory differ from HEAD (the code that ran is then not
    exactly the commit it records); None outside a repository."""
    repo = repository_of(results_dir)
    if repo is None:
        return None
    outside = f":(exclude){results_dir.resolve().relative_to(repo.resolve())}"
    return git(repo, "diff", "--quiet", "HEAD", "--", ".", outside).returncode != 0


def blob_hash(path: Path) -> str:
    """What `git hash-object` prints for the file (computed here: no repository needed)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commits_touching(path: Path) -> list[str]:
    """The commits that changed `path`, newest first (empty: never committed)."""
    result = git(path.parent, "log", "--format=%H", "--", path.name)
    return result.stdout.split() if result.returncode == 0 else []


def is_ancestor(repo: Path, ancestor: str, commit: str) -> bool | None:
    """True / False, None when git does not know one of the commits."""
    result = git(repo, "merge-base", "--is-ancestor", ancestor, commit)
    return {0: True, 1: False}.get(result.returncode)


def known_commit(repo: Path, commit: str) -> bool:
    return git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0


def committed_unchanged(path: Path) -> bool:
    """The file is tracked and its working-tree content equals HEAD's."""
    if not commits_touching(path):
        return False
    return git(path.parent, "diff", "--quiet", "HEAD", "--", path.name).returncode == 0


# ---------------------------------------------------------------------------------------------- writing


def build_registration(design: Design, power: dict[str, Any]) -> dict[str, Any]:
    return {
        "study": "CIPO vs GRPO vs frozen-anchor CIPO: correction on a trained and a reworded template (issue 27)",
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "design": design.as_dict(),
        "config_sha256": registered_fingerprints(design),
        "configs": registered_configs(design),  # what the hashes are of: a changed one is then told key by key
        "claims": [claim.as_dict() for claim in analysis.CLAIMS],
        "secondary": [{"comparison": f"{b} - {a}", "measure": measure} for a, b, measure in analysis.SECONDARY],
        "measures": analysis.MEASURE_LABELS,
        "verdict_rules": analysis.VERDICT_RULES,
        "bootstrap": {"resamples": analysis.BOOTSTRAP_RESAMPLES, "seed": analysis.BOOTSTRAP_SEED,
                      "confidence": analysis.CONFIDENCE, "min_seeds": analysis.MIN_SEEDS},
        "analysis_blob_sha1": {module.name: blob_hash(module) for module in ANALYSIS_MODULES},
        "power": power,
    }


def write_registration(results_dir: Path, registration: dict[str, Any]) -> Path:
    """Write registration.json; refused once any unit has finished (the registration must precede them all)."""
    finished = sorted(str(path.parent.relative_to(results_dir)) for path in results_dir.rglob(DONE_FILE))
    if finished:
        raise SystemExit(f"{results_dir}: units already ran ({', '.join(finished[:3])}...): the registration cannot "
                         "change after the first unit; a new registration needs a new results directory")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / REGISTRATION_FILE
    path.write_text(json.dumps(registration, indent=1) + "\n")
    return path


def load_registration(results_dir: Path) -> dict[str, Any] | None:
    path = results_dir / REGISTRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def registration_sha256(results_dir: Path) -> str:
    return hashlib.sha256((results_dir / REGISTRATION_FILE).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- before a unit


def check_before_running(design: Design, results_dir: Path) -> None:
    """Stop, before any work, unless the registration is committed, unchanged, and registers this design and
    these configs."""
    path = results_dir / REGISTRATION_FILE
    registration = load_registration(results_dir)
    if registration is None:
        raise SystemExit(f"{path}: no registration; write it with --register and commit it before any unit runs")
    if not committed_unchanged(path):
        raise SystemExit(f"{path}: not committed, or changed since its commit; commit it (in a commit of its own) "
                         "before any unit runs")
    registered = Design.from_dict(registration["design"])
    if registered != design:
        changed = sorted(key for key, value in design.as_dict().items() if registration["design"].get(key) != value)
        raise SystemExit(f"{path}: the study's settings differ from the registered ones in {', '.join(changed)}")
    now = registered_fingerprints(design)
    changed = sorted(name for name, value in now.items() if registration["config_sha256"].get(name) != value)
    if changed:
        configs, keys = registered_configs(design), []
        for name in changed:
            keys += [f"{name}: {key}" for key in changed_keys(registration.get("configs", {}).get(name, {}),
                                                              configs.get(name, {}))]
        raise SystemExit(f"{path}: the resolved config of {', '.join(changed)} differs from the registered one "
                         f"({'; '.join(keys[:8]) or 'keys not recorded'}): run the study from code whose configs "
                         "resolve as registered (a branch from the registration commit), or, while no unit has run, "
                         "register again with --register and commit that")


# ---------------------------------------------------------------------------------------------- in the report

TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"  # done.json's started / finished


def unit_started(record: dict[str, Any]) -> float | None:
    """When a unit began (its done.json's `started`; `finished` for a record without it), as a Unix time."""
    stamp = record.get("started") or record.get("finished")
    if not stamp:
        return None
    try:
        return datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def commit_time(repo: Path, commit: str) -> float:
    """The commit's committer time (Unix seconds)."""
    return float(git(repo, "log", "-1", "--format=%ct", commit).stdout.strip())


@dataclass(frozen=True)
class PrecedenceCheck:
    registration_commit: str | None  # the latest commit on HEAD's history that touched the registration
    registration_commits: int  # how many commits touched the registration file
    units_checked: int
    refused: dict[str, str]  # unit -> why its results cannot be shown to follow the registration (left out)
    uncommitted: list[str]  # accepted units whose results are not committed yet (checked by code commit and time)
    analysis_changed: list[str]  # analysis modules whose blob hash differs from the registered one
    dirty: list[str]  # units that ran with tracked files changed since their code commit

    def lines(self) -> list[str]:
        if self.registration_commit is None:
            return ["**The registration is not committed** (on this branch's history): no unit's results can be "
                    f"shown to follow it, and all {self.units_checked} finished units are left out of the analysis."]
        lines = [f"Registration: commit {self.registration_commit[:12]} (the latest of {self.registration_commits} "
                 f"commit(s) that touched {REGISTRATION_FILE}, an ancestor of HEAD)."]
        accepted = self.units_checked - len(self.refused)
        if not self.refused:
            lines.append(f"Checked with git: all {self.units_checked} finished units ran at commits that descend from "
                         "it and started after its commit time, and every committed result was committed after it.")
        else:
            lines.append(f"**{len(self.refused)} unit(s) refused and left out of the analysis** (their results cannot "
                         f"be shown to follow the registration; {accepted} accepted):")
            lines += [f"- {unit}: {why}" for unit, why in sorted(self.refused.items())]
        if self.dirty:
            lines.append(f"Ran with tracked files changed since their code commit: {', '.join(self.dirty)}.")
        if self.uncommitted:
            lines.append(f"Results not committed yet (their code commit and time were checked): "
                         f"{', '.join(self.uncommitted)}.")
        lines.append("The analysis code is the registered version." if not self.analysis_changed else
                     f"**The analysis code changed since the registration**: {', '.join(self.analysis_changed)} "
                     "(verdicts below come from the changed code).")
        return lines


def check_precedence(results_dir: Path, registration: dict[str, Any] | None) -> PrecedenceCheck:
    """Did the registration come before every unit, by git's history? The registration commit is the latest commit
    that touched registration.json on HEAD's history (so an ancestor of HEAD; one committed on another branch only
    does not count). A unit is accepted when the registration commit is its code commit or an ancestor of it, the
    unit started at or after the registration's commit time, and its done.json, if committed, was first committed
    in a descendant of the registration commit (not in it). Every other unit is refused: the report leaves its
    results out."""
    path = results_dir / REGISTRATION_FILE
    analysis_changed = [] if registration is None else [
        module.name for module in ANALYSIS_MODULES
        if registration["analysis_blob_sha1"].get(module.name) != blob_hash(module)]
    history = commits_touching(path) if path.is_file() else []
    repo = repository_of(results_dir)
    dones = sorted(results_dir.rglob(DONE_FILE))
    units = [str(done.parent.relative_to(results_dir)) for done in dones]
    if not history or repo is None:
        refused = {unit: "the registration is not committed" for unit in units}
        return PrecedenceCheck(None, 0, len(dones), refused, [], analysis_changed, [])
    registered_at = history[0]
    registered_time = commit_time(repo, registered_at)
    refused, uncommitted, dirty = {}, [], []
    for unit, done in zip(units, dones):
        record = json.loads(done.read_text())
        if record.get("code_dirty"):
            dirty.append(unit)
        why = refusal(repo, registered_at, registered_time, record, done)
        if why:
            refused[unit] = why
        elif not commits_touching(done):
            uncommitted.append(unit)
    return PrecedenceCheck(registered_at, len(history), len(dones), refused, uncommitted, analysis_changed, dirty)


def refusal(repo: Path, registered_at: str, registered_time: float, record: dict[str, Any], done: Path) -> str | None:
    """Why one unit's results cannot be shown to follow the registration (None: they can)."""
    code_commit = record.get("code_commit")
    if not code_commit:
        return "records no code commit"
    if code_commit != registered_at and not is_ancestor(repo, registered_at, code_commit):
        return (f"ran at {code_commit[:12]}, which does not descend from the registration"
                + ("" if known_commit(repo, code_commit) else " (a commit git does not know here)"))
    started = unit_started(record)
    if started is None:
        return "records no start time"
    if started < registered_time:
        return (f"started {record.get('started') or record.get('finished')}, before the registration's commit time "
                f"{datetime.fromtimestamp(registered_time, timezone.utc).strftime(TIME_FORMAT)}")
    added = commits_touching(done)
    if added and added[-1] == registered_at:
        return "its results were committed together with the registration"
    if added and not is_ancestor(repo, registered_at, added[-1]):
        return f"its results were committed at {added[-1][:12]}, before (or beside) the registration"
    return None
