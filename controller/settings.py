"""What every part's settings share: a strict, frozen section of `controller.toml`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Port = Annotated[int, Field(ge=0, le=65535)]


class Section(BaseModel):
    """One `[section]` of the controller's config: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
