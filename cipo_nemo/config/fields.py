"""The schema's building blocks: the strict base model, constrained number types and shared validators."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
TaskFamily = Literal["math", "code"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def require_placeholders(text: str, placeholders: tuple[str, ...]) -> str:
    missing = [p for p in placeholders if p not in text]
    if missing:
        raise ValueError(f"template lacks the placeholder(s) {', '.join(missing)}")
    return text


def not_below(value: float, info: ValidationInfo, lower_key: str) -> float:
    lower = info.data.get(lower_key)  # absent when the lower key itself failed validation
    if lower is not None and value < lower:
        raise ValueError(f"must be >= {lower_key} ({lower}), got {value}")
    return value
