"""The data-source sections of the schema (`data.train`, `data.validation`): where items come from.

Part of the one schema of cipo_nemo/config/schema.py, which imports them from here (the file limit of
docs/architecture.md keeps each file under 600 lines); the rules of that module's docstring hold here too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from cipo_nemo.config.schema_base import PositiveInt, StrictModel, TaskFamily


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


class DataSourceConfig(StrictModel):
    kind: Literal["reasoning_gym", "file"] = Field(description="Which of the blocks below is used.")
    family: TaskFamily = Field(description="Task family of the items (file rows may override per row).")
    reasoning_gym: ReasoningGymSourceConfig
    file: FileSourceConfig

    @field_validator("file")
    @classmethod
    def _file_has_path(cls, value: FileSourceConfig, info: ValidationInfo) -> FileSourceConfig:
        if info.data.get("kind") == "file" and not value.path:
            raise ValueError("kind is 'file' but file.path is not set")
        return value
