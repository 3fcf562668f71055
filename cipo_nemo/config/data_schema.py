"""The `data` section of the schema (schema.py): where training and held-out items come from and how prompts read."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from cipo_nemo.config.fields import PositiveInt, Probability, StrictModel, TaskFamily


class FileFields(StrictModel):
    """Which column of a file holds what. Exactly one of `prompt` and `messages` names a column."""

    id: str | None = Field(description="Column with a stable item id (null: '<file>:<row>').")
    prompt: str | None = Field(description="Column with the problem text, or with a list of chat messages.")
    messages: str | None = Field(description="Column with chat messages [{role, content}] instead of a prompt.")
    answer: str = Field(min_length=1, description="Column with the ground truth (dotted paths reach into nested "
                        "columns, e.g. reward_model.ground_truth).")
    family: str | None = Field(description="Column with a per-row task family (null: the source's family).")

    @field_validator("messages")
    @classmethod
    def _one_prompt_column(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "prompt" in info.data and (info.data["prompt"] is None) == (value is None):
            raise ValueError("set exactly one of fields.prompt and fields.messages")
        return value


class FileSourceConfig(StrictModel):
    path: str | None = Field(description="JSONL file, parquet file, or a datasets.save_to_disk directory.")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(description="auto: by suffix / directory.")
    split: str | None = Field(description="Split of a saved DatasetDict (null for a plain Dataset).")
    fields: FileFields


class ReasoningGymSourceConfig(StrictModel):
    name: str = Field(min_length=1, description="reasoning-gym generator name, e.g. basic_arithmetic.")
    size: PositiveInt = Field(description="Number of items generated.")
    seed: Annotated[int, Field(ge=0)] = Field(description="Generator seed (same seed, same items).")
    options: dict[str, Any] = Field(description="Extra generator options (e.g. max_terms, max_digits).")


class HubSourceConfig(StrictModel):
    """A dataset by hub id, loaded with `datasets.load_dataset` (cipo_nemo/data/hub_datasets.py)."""

    path: str | None = Field(description="Hub dataset id (owner/name: the Hugging Face cache, else downloaded once by "
                             "the preflight), or a local directory laid out like a dataset repository.")
    name: str | None = Field(description="Dataset config name (null: the dataset's only or default config).")
    split: str = Field(min_length=1, description="Split to read, e.g. train or test.")
    revision: str | None = Field(min_length=1, description="Hub revision (branch, tag or commit) to pin (null: main).")
    fields: FileFields


class DataSourceConfig(StrictModel):
    kind: Literal["reasoning_gym", "file", "hf"] = Field(description="Which of the blocks below is used.")
    family: TaskFamily = Field(description="Task family of the items (file rows may override per row).")
    reasoning_gym: ReasoningGymSourceConfig
    file: FileSourceConfig
    hf: HubSourceConfig

    @field_validator("file", "hf")
    @classmethod
    def _chosen_block_has_path(cls, value: FileSourceConfig | HubSourceConfig,
                               info: ValidationInfo) -> FileSourceConfig | HubSourceConfig:
        if info.data.get("kind") == info.field_name and not value.path:
            raise ValueError(f"kind is {info.field_name!r} but {info.field_name}.path is not set")
        return value


class InstructionConfig(StrictModel):
    math: str = Field(description="Appended to every math problem.")
    code: str = Field(description="Appended to every code problem.")


class DataConfig(StrictModel):
    train: DataSourceConfig
    validation: DataSourceConfig | None = Field(description="Held-out set (null: none).")
    instructions: InstructionConfig
    system_prompt: str | None = Field(description="System message for the chat template (null: none).")
    shuffle: bool = Field(description="Shuffle the training items each epoch (seeded by run.seed).")
    max_prompt_tokens: PositiveInt = Field(description="Items whose rendered prompt is longer are skipped and counted.")
    max_bad_rows: Probability = Field(
        description="Largest share of a source's rows that may be skipped as malformed, or whose gold answer the "
        "verifier cannot read, before the preflight stops (exit 2)."
    )
    chat_template: str | None = Field(description="Jinja chat template file for a tokenizer without one (null: its own).")
    chat_template_kwargs: dict[str, Any] = Field(
        description="Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3."
    )
