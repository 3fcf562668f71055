"""Preflight: everything about a run that can be checked before workers start.

Resolves and validates the config, checks its layout and memory against the cluster (cipo_nemo/plan.py), loads
every data source (counting skipped rows) and the named validation benchmarks, checks that the verifier can read
the gold answers (each gold, quoted back as `\\boxed{gold}`, must score as correct) or that `verifier.custom`
imports, computes the per-step plan, says whether each model and hub dataset is here, and, once the tokenizer is
here, drops the prompts longer than data.max_prompt_tokens. A training run downloads a hub model or dataset that is
absent (once); the dry run (`fetch=False`) never downloads, but stops exactly where the training run would: every
check here raises in both, and an absent hub id while HF_HUB_OFFLINE=1 raises the training run's own error. The
training loop runs this first so that a bad config or layout, an empty dataset or gold answers the verifier cannot
parse stop the run before any heavy work.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.async_rollouts import describe_schedule
from cipo_nemo.config import ConfigError, MasterConfig
from cipo_nemo.config.schema import DataSourceConfig
from cipo_nemo.data.frozen_attempts import coverage, load_frozen_attempts
from cipo_nemo.data.hub_datasets import DatasetDownloader, DatasetPresence, dataset_presence, fetch_dataset
from cipo_nemo.data.prompts import chat_template_file, drop_long_prompts
from cipo_nemo.data.sources import DataError, LoadReport, TaskItem, describe, load_items
from cipo_nemo.environments.custom_reward import CustomRewardError, load_reward_function
from cipo_nemo.environments.math import reason_counts
from cipo_nemo.environments.math_pool import MathVerifierPool
from cipo_nemo.eval.benchmarks import BenchmarkError
from cipo_nemo.eval.registry import load_registered_benchmark, registered
from cipo_nemo.models.hub import (
    Downloader,
    ModelNotFoundError,
    ModelPresence,
    fetch_model,
    find_local_model_dir,
    model_presence,
)
from cipo_nemo.plan import LaunchPlan, LayoutError, plan_launch
from cipo_nemo.utils.checkpoint import resume_checkpoint
from cipo_nemo.utils.tracking import TrackerNotInstalled, check_trackers

logger = logging.getLogger(__name__)


class InstallError(Exception):
    """The software environment cannot run this config (a package that is installed but broken)."""


@dataclass(frozen=True)
class StepPlan:
    base_samples: int  # B * G
    max_anchors: int  # min(anchor cap, B * G); 0 for GRPO
    max_correction_samples: int  # max_anchors * G_c
    optimizer_steps: int  # per RL step, at the most: epochs x ceil(samples / policy.train_global_batch_size)

    @property
    def max_samples(self) -> int:
        return self.base_samples + self.max_correction_samples


@dataclass
class PreflightReport:
    plan: StepPlan
    launch: LaunchPlan | None = None  # the config resolved against its cluster (cipo_nemo/plan.py)
    data: list[LoadReport] = field(default_factory=list)
    # "train", "validation" and "benchmark:<name>" (validation.benchmarks) -> loaded items, handed to the trainer
    items: dict[str, list[TaskItem]] = field(default_factory=dict)
    gold_check: dict[str, int] = field(default_factory=dict)  # verifier reason -> count, on math golds
    models: list[ModelPresence] = field(default_factory=list)  # policy.model_name (and policy.tokenizer)
    datasets: list[DatasetPresence] = field(default_factory=list)  # hub datasets: data.*.hf, validation.benchmarks
    prompt_lengths: str = ""  # what the prompt-length check found (or why it did not run)
    frozen_attempts: dict[str, int] = field(default_factory=dict)  # cipo.anchor_source frozen_start: coverage
    schedule: list[str] = field(default_factory=list)  # async.enabled: the schedule (async_rollouts.py)

    def lines(self) -> list[str]:
        plan = self.plan
        lines = [presence.line() for presence in self.models]
        lines += [presence.line() for presence in self.datasets]
        lines += [describe(report) for report in self.data]
        if self.gold_check:
            counts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.gold_check.items()))
            lines.append(f"verifier on the gold answers: {counts}")
        if self.prompt_lengths:
            lines.append(self.prompt_lengths)
        if self.frozen_attempts:
            found = self.frozen_attempts
            lines.append(f"cipo.frozen_attempts: {found['in_file']} of {found['items']} training items, "
                         f"{found['with_wrong']} with a wrong and {found['with_right']} with a right attempt")
        lines.append(
            f"per step: {plan.base_samples} base rollouts, up to {plan.max_anchors} anchors and "
            f"{plan.max_correction_samples} correction rollouts ({plan.max_samples} samples at most), "
            f"up to {plan.optimizer_steps} optimizer step(s)"
        )
        return lines + self.schedule + (self.launch.lines() if self.launch else [])


def plan_step(cfg: MasterConfig) -> StepPlan:
    base = cfg.grpo.prompts_per_step * cfg.grpo.samples_per_prompt
    anchors = min(cfg.cipo.max_anchors_per_step, base) if cfg.cipo.enabled else 0
    return StepPlan(base_samples=base, max_anchors=anchors,
                    max_correction_samples=cfg.max_samples_per_step() - base,
                    optimizer_steps=cfg.max_optimizer_steps() // cfg.grpo.num_steps)


def check_gold_answers(items: list[TaskItem], *, num_workers: int, timeout_s: float) -> dict[str, int]:
    """Score `\\boxed{gold}` against each math gold; anything but "correct" means the verifier misreads a gold."""
    math_items = [item for item in items if item.family == "math"]
    if not math_items:
        return {}
    with MathVerifierPool(num_workers=num_workers, timeout_s=timeout_s) as pool:
        verdicts = pool.score([f"\\boxed{{{item.answer}}}" for item in math_items], [item.answer for item in math_items])
    unreadable = [item for item, verdict in zip(math_items, verdicts) if verdict.reason != "correct"]
    for item in unreadable[:5]:
        logger.warning("the verifier does not accept gold answer %r of %s as correct", item.answer, item.origin)
    return reason_counts(verdicts)


def check_transformer_engine(cfg: MasterConfig) -> None:
    """A Megatron policy that may use Transformer Engine (layer_spec auto or transformer_engine) needs an installed TE
    to import; an absent TE is fine here (the dry run also runs on login nodes without it; the workers choose)."""
    if cfg.policy.backend != "megatron" or cfg.policy.megatron.layer_spec == "local":
        return
    from cipo_nemo.models.policy.cpu_compat import TransformerEngineBroken, transformer_engine_importable

    try:
        transformer_engine_importable()
    except TransformerEngineBroken as err:
        raise InstallError(f"{err}. Reinstall it against this torch (scripts/install.sh --gpu, or the Dockerfile), "
                           "or set policy.megatron.layer_spec=local to train without it") from None


def check_tracker_clients(cfg: MasterConfig) -> None:
    """A configured W&B or MLflow needs its client installed (InstallError, one line with the pip command) and an
    MLflow tracking URI that opens as a store (ConfigError): both would otherwise fail after the workers started."""
    try:
        check_trackers(cfg.logger)
    except TrackerNotInstalled as err:
        raise InstallError(str(err)) from None


def check_custom_reward(cfg: MasterConfig) -> None:
    """`verifier.custom` must import and be callable here, before any worker starts (its pool imports it again)."""
    if cfg.verifier.custom is None:
        return
    try:
        load_reward_function(cfg.verifier.custom)
    except CustomRewardError as err:
        raise ConfigError(f"verifier.custom: {err}") from None


def check_models(cfg: MasterConfig, launch: LaunchPlan, *, fetch: bool,
                 download: Downloader | None = None) -> list[ModelPresence]:
    """Where the model (and a separate tokenizer) stand; with `fetch` (a training run, on the driver's node, before
    any worker) a hub id absent from the cache is downloaded now, once. Raises ModelNotFoundError."""
    weights = launch.shape.total_params() * launch.shape.dtype_bytes  # the download's size, from the architecture
    wanted = [("policy.model_name", cfg.policy.model_name, cfg.policy.model_revision, weights)]
    if cfg.policy.tokenizer is not None:
        wanted.append(("policy.tokenizer", cfg.policy.tokenizer, None, None))
    presences = []
    for key, name, revision, estimated_bytes in wanted:
        if fetch:
            fetch_model(name, revision, key=key, download=download)
        presences.append(model_presence(name, revision, key=key, estimated_bytes=estimated_bytes))
    return presences


def run_preflight(cfg: MasterConfig, *, check_memory: bool = True, fetch: bool = False,
                  download: Downloader | None = None,
                  download_dataset: DatasetDownloader | None = None) -> PreflightReport:
    """Load and check everything a run needs before workers start. Raises LayoutError (a ConfigError) when the
    layout does not fit the cluster or the model, or, with `check_memory`, when the memory estimate exceeds a GPU;
    ConfigError when verifier.custom does not load or a validation benchmark is unknown; ModelNotFoundError when
    the model's architecture is unknown, or a hub id is absent and cannot be downloaded (with `fetch`: the download
    failed; either way: HF_HUB_OFFLINE=1); DataError on unusable data, an absent hub dataset that cannot be
    downloaded, or no prompt within data.max_prompt_tokens; InstallError or ConfigError when a configured tracker
    (W&B, MLflow) cannot start. The model download comes last, so that a bad config or dataset never waits for it."""
    check_transformer_engine(cfg)
    check_tracker_clients(cfg)
    check_custom_reward(cfg)
    if cfg.data.chat_template is not None:
        chat_template_file(cfg.data.chat_template)
    resume_checkpoint(cfg)  # a run directory whose checkpoint another setup saved stops here, in seconds
    step = plan_step(cfg)
    # the layout first: it needs no data, and a 70B layout error should not wait for a dataset to load
    try:
        launch = plan_launch(cfg, base_samples=step.base_samples, max_correction_samples=step.max_correction_samples)
    except ModelNotFoundError:
        if not fetch:  # offline and absent: the training run's own line, not the unknown architecture
            model_presence(cfg.policy.model_name, cfg.policy.model_revision)
            raise
        # a hub id whose architecture only its own config.json tells: the download cannot wait for the end
        fetch_model(cfg.policy.model_name, cfg.policy.model_revision, download=download)
        launch = plan_launch(cfg, base_samples=step.base_samples, max_correction_samples=step.max_correction_samples)
    if check_memory and launch.memory_problems:
        raise LayoutError("\n".join(launch.memory_problems))
    report = PreflightReport(plan=step, launch=launch, schedule=describe_schedule(cfg))
    sources = {"train": cfg.data.train, "validation": cfg.data.validation}
    for name, source in sources.items():
        if source is None or not hub_source_here(report, source, section=f"data.{name}", fetch=fetch,
                                                  download=download_dataset):
            continue
        try:
            items, load_report = load_items(source)
        except DataError as err:
            raise DataError(f"data.{name}: {err}") from None
        report.data.append(load_report)
        report.items[name] = items
        unreadable_golds = 0
        if name == "train" and cfg.verifier.custom is None:  # a custom reward reads the golds its own way
            report.gold_check = check_gold_answers(
                items, num_workers=cfg.verifier.num_workers, timeout_s=cfg.verifier.timeout_s
            )
            unreadable_golds = sum(count for reason, count in report.gold_check.items() if reason != "correct")
        check_bad_rows(f"data.{name}", load_report, unreadable_golds, max_share=cfg.data.max_bad_rows)
    load_validation_benchmarks(cfg, report, fetch=fetch, download=download_dataset)
    report.frozen_attempts = check_frozen_attempts(cfg, report.items.get("train", []))
    report.models = check_models(cfg, launch, fetch=fetch, download=download)
    report.prompt_lengths = check_prompt_lengths(cfg, report.items)
    return report


def check_frozen_attempts(cfg: MasterConfig, train_items: list[TaskItem]) -> dict[str, int]:
    """With cipo.anchor_source frozen_start: the file loads, and it holds attempts at the training items (one
    that holds none is the attempts of another data set). Returns its coverage (empty otherwise)."""
    correction = cfg.cipo
    if not correction.enabled or correction.anchor_source != "frozen_start":
        return {}
    found = coverage(load_frozen_attempts(correction.frozen_attempts, is_success=is_success),
                     [item.id for item in train_items])
    if not found["in_file"]:
        raise DataError(f"cipo.frozen_attempts: {correction.frozen_attempts} holds no attempt at any of the "
                        f"{found['items']} training items (ids differ: attempts at another data set?)")
    return found


def hub_source_here(report: PreflightReport, source: DataSourceConfig, *, section: str, fetch: bool,
                    download: DatasetDownloader | None) -> bool:
    """A `kind: hf` source's dataset: downloaded now when absent (`fetch`), else only looked up; False when it is
    absent (a dry run: its rows are checked by the training run's preflight). Other kinds are always here."""
    if source.kind != "hf":
        return True
    assert source.hf.path is not None, "the schema requires hf.path when kind is 'hf'"
    report.datasets.append(hub_dataset_here(source.hf.path, source.hf.revision, key=f"{section}.hf.path",
                                            fetch=fetch, download=download))
    return report.datasets[-1].directory is not None


def hub_dataset_here(path: str, revision: str | None, *, key: str, fetch: bool,
                     download: DatasetDownloader | None) -> DatasetPresence:
    if fetch:
        return DatasetPresence(key=key, path=path, revision=revision,
                               directory=fetch_dataset(path, revision, key=key, download=download))
    return dataset_presence(path, revision, key=key)  # offline and absent: the training run's own DataError


def load_validation_benchmarks(cfg: MasterConfig, report: PreflightReport, *, fetch: bool,
                               download: DatasetDownloader | None) -> None:
    """validation.benchmarks: each named benchmark's hub dataset, here or fetched, and its problems."""
    for name in cfg.validation.benchmarks:
        try:
            entry = registered(name)
        except BenchmarkError as err:
            raise ConfigError(f"validation.benchmarks: {err}") from None
        presence = hub_dataset_here(entry.hub_id, entry.revision, key=f"validation.benchmarks {name}", fetch=fetch,
                                    download=download)
        report.datasets.append(presence)
        if presence.directory is None:
            continue
        try:
            benchmark = load_registered_benchmark(name, fetch=False)
        except BenchmarkError as err:
            raise DataError(f"validation.benchmarks: {err}") from None
        report.items[f"benchmark:{name}"] = benchmark.items
        report.data.append(LoadReport(source=benchmark.source, loaded=len(benchmark.items),
                                      skipped=Counter(benchmark.skipped)))


def check_prompt_lengths(cfg: MasterConfig, items: dict[str, list[TaskItem]]) -> str:
    """Drop, in place, the prompts longer than data.max_prompt_tokens (the trainer's rule) once the tokenizer is
    here; a split with none left is the DataError setup would raise later. Returns the report's line."""
    name, revision, key = ((cfg.policy.tokenizer, None, "policy.tokenizer") if cfg.policy.tokenizer else
                           (cfg.policy.model_name, cfg.policy.model_revision, "policy.model_name"))
    directory = find_local_model_dir(name, revision, key=key)
    if directory is None:
        return "prompt lengths: not checked (the tokenizer comes with the model, which is not here yet)"
    from transformers import AutoTokenizer

    from cipo_nemo.data.prompts import use_chat_template_file

    tokenizer = use_chat_template_file(AutoTokenizer.from_pretrained(directory), cfg.data.chat_template)
    dropped = {}
    for split, split_items in items.items():
        try:
            items[split], dropped[split] = drop_long_prompts(
                split_items, tokenizer=tokenizer, instructions=cfg.data.instructions,
                system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens,
                template_kwargs=cfg.data.chat_template_kwargs)
        except DataError as err:
            raise DataError(f"{split_section(split)}: {err}") from None
    counts = ", ".join(f"{split.removeprefix('benchmark:')} {count}" for split, count in dropped.items())
    return f"prompts over data.max_prompt_tokens={cfg.data.max_prompt_tokens} dropped: {counts or 'none loaded'}"


def split_section(split: str) -> str:
    """Where a split of PreflightReport.items is configured: data.train, data.validation, validation.benchmarks."""
    return f"data.{split}" if not split.startswith("benchmark:") else f"validation.benchmarks {split.split(':', 1)[1]}"


def check_bad_rows(section: str, load_report: LoadReport, unreadable_golds: int, *, max_share: float) -> None:
    """Stop when more than `data.max_bad_rows` of a source's rows were skipped as malformed or carry a gold answer
    the verifier cannot read: a dataset that broken is a wrong field mapping or a wrong file, not noise."""
    rows = load_report.loaded + sum(load_report.skipped.values())
    bad = sum(load_report.skipped.values()) + unreadable_golds
    if rows and bad / rows > max_share:
        raise DataError(
            f"{section}: {bad} of {rows} rows are unusable ({describe(load_report)}; golds the verifier cannot "
            f"read: {unreadable_golds}), more than data.max_bad_rows = {max_share:.0%}; check data.*.file.fields "
            "or raise data.max_bad_rows"
        )
