"""Typed contracts between the parts of the loop, stored in the store as versioned JSON.

The stage plan is written by the daemon and read by the stage subprocess; the stage
result and the gate verdict are written back and read by the runner, status, metrics and
the CLI. Before these models they were plain dicts read by key in dozens of places, so a
renamed key failed at run time, far from the writer. Each model carries
``schema_version``: a row written by an older daemon still loads (missing fields take
their defaults, see :func:`StagePlan.from_json`), and a newer, incompatible version is
refused with a clear error instead of being misread.

This module sits in ``store`` (the bottom layer) so every other layer may import it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from store.errors import EvergreenError


class ContractError(EvergreenError, ValueError):
    """A stored contract that this version cannot read (corrupt or from a newer daemon)."""


class _Contract(BaseModel):
    """Shared behaviour: versioned JSON round trip; unknown keys are kept, not lost."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1

    @classmethod
    def from_json(cls, raw: str | bytes | dict[str, Any] | None) -> Self:
        """Load a stored contract; ``None``/empty gives the defaults (rows from before)."""
        data: Any = raw or {}
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data or "{}")
            except json.JSONDecodeError as exc:
                raise ContractError(f"{cls.__name__}: stored JSON is corrupt: {exc}") from None
        if not isinstance(data, dict):
            raise ContractError(f"{cls.__name__}: expected a JSON object, got {type(data)}")
        version = int(data.get("schema_version") or 1)
        if version > cls.SCHEMA_VERSION:
            raise ContractError(
                f"{cls.__name__} schema_version {version} is newer than this Evergreen"
                f" understands ({cls.SCHEMA_VERSION}): upgrade Evergreen"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ContractError(f"{cls.__name__}: {exc}") from None

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class StagePlan(_Contract):
    """Everything a stage subprocess needs: which chunks, which base, which recipe.

    Written once by the planner (``daemon.training.plan``) before the stage starts; the
    subprocess reads nothing else, so a stage can be resumed or re-run exactly.
    """

    track: str = "default"
    # Data, chosen by the selection and replay policies (their reasons below).
    new_chunk_ids: list[int] = Field(default_factory=list)
    replay_chunk_ids: list[int] = Field(default_factory=list)
    holdout_chunk_ids: list[int] = Field(default_factory=list)
    retention_chunk_ids: list[int] = Field(default_factory=list)
    score_chunk_ids: list[int] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    new_tokens: int = 0
    replay_tokens: int = 0
    replay_budget_tokens: int = 0
    selection_policy: str = ""
    replay_policy: str = ""
    new_sha256: str = ""
    replay_sha256: str = ""
    # Synthetic study text of the new chunks (store.synthetic): trained with the new
    # data, never evaluated on, never offered to the replay buffer; the replay budget
    # stays ``ratio × new_tokens`` (user tokens only).
    synthetic_chunk_ids: list[int] = Field(default_factory=list)
    synthetic_tokens: int = 0
    synthetic_sha256: str = ""
    # A retry whose recipe was adapted to the previous rejections of its data
    # (daemon.scheduling.retry): attempt, causes, the changes made; {} = not a retry.
    retry: dict[str, Any] = Field(default_factory=dict)
    # Model lineage.
    base_model: str = ""
    base_model_sha256: str = ""
    parent_version: str | None = None
    parent_path: str = ""
    init_adapter: str = ""
    output_version: str = ""
    output_dir: str = ""
    stage_dir: str = ""
    # Recipe: the training section of the config at planning time (a dict, so a plan
    # written by an older daemon still loads when a key is added or removed).
    hparams: dict[str, Any] = Field(default_factory=dict)
    general_eval: str = ""
    general_replay: str = ""
    general_mix: float = 0.0
    eval_sets: list[str] = Field(default_factory=list)
    eval_match: str = "contains"


class GateVerdict(_Contract):
    """The promotion gate's decision on one candidate, with every reason."""

    promote: bool = False
    reasons: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    # metric key -> "regressed" | "missing" | "not_finite" (empty from older daemons and
    # from promotion policies that do not say; a retry then reads the ``failed`` texts)
    failed_metrics: dict[str, str] = Field(default_factory=dict)
    summary: str = ""


class StageResult(_Contract):
    """How a stage ended, as the runner reports it to the service, status and CLI.

    ``status`` is promoted | rejected | failed | interrupted (stopped, resumes later) |
    skipped (nothing planned).
    """

    stage_id: int | None = None
    status: str
    reason: str = ""
    version: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: GateVerdict | None = None
