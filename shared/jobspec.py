"""The job spec: what a data scientist submits to train one federated model.

A TOML file (YAML too, `.yaml`/`.yml`, read with `yaml.safe_load`):

    name = "digits-demo"
    participants = ["hospital-us", "hospital-asia", "hospital-eu"]
    model = "digits.fedsky"          # a fedsky model file, relative to this file
    dataset = "digits"               # each hospital resolves the name in its own agent config
    selection_metric = "f1"          # a name from fedsky.shared.metrics.METRICS

    [dataset_overrides]              # optional: a participant that names its copy differently
    hospital-eu = "digits-eu"

    [hyperparameters]
    rounds = 3
    local_epochs = 1
    batch_size = 32
    learning_rate = 0.05
    optimizer = "sgd"                # sgd | adam
    min_participants = 3             # per round; defaults to every participant

    [resources]                      # the least a training VM must have (default 2 vCPU, 4 GiB)
    vcpus = 2
    memory_gib = 4
    disk_gib = 20

    [placement]
    max_cost = "85000 KRW/month"     # AMOUNT USD|KRW / month|job
    max_latency_ms = 250
    cost_weight = 0.5                # 1 = cost only, 0 = latency only
    method = "exact"                 # or "nsga2" (NSGA-II over the same offers)

Errors name the file and the key, e.g.
`job.toml: key 'hyperparameters.optimizer': Input should be 'sgd' or 'adam' (got 'rmsprop')`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from fedsky.shared.config import ConfigError, parse_config, resolve_path
from fedsky.shared.ids import InvalidIdError, check_agent_id
from fedsky.shared.metrics import DEFAULT_SELECTION_METRIC, METRIC_NAMES
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError


def _selection_metric(value: object) -> object:
    """One of the metric table's names, exactly (aliases are for aggregators and the CLI)."""
    if value in METRIC_NAMES:
        return value
    # The same error (type and text) pydantic gives for a Literal of these names.
    *first, last = (repr(name) for name in METRIC_NAMES)
    expected = f"{', '.join(first)} or {last}" if first else last
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


SelectionMetric = Annotated[str, BeforeValidator(_selection_metric)]
Optimizer = Literal["sgd", "adam"]

DATASET_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DatasetName = Annotated[str, Field(pattern=DATASET_NAME_PATTERN)]

_COST_RE = re.compile(
    r"^\s*(?P<amount>[0-9][0-9_,]*(?:\.[0-9]+)?)\s*(?P<currency>USD|KRW)\s*/\s*(?P<per>month|job)\s*$",
    re.IGNORECASE,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxCost(_Strict):
    """A cost ceiling: an amount in a currency per month of aggregator time or per job."""

    amount: Annotated[float, Field(gt=0)]
    currency: Literal["USD", "KRW"]
    per: Literal["month", "job"]

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            m = _COST_RE.match(value)
            if not m:
                raise ValueError(
                    "expected 'AMOUNT CURRENCY/PERIOD' with CURRENCY USD or KRW and PERIOD month "
                    "or job, e.g. '85000 KRW/month' or '12.5 USD/job'"
                )
            return {
                "amount": float(m["amount"].replace(",", "").replace("_", "")),
                "currency": m["currency"].upper(),
                "per": m["per"].lower(),
            }
        return value

    def __str__(self) -> str:
        return f"{self.amount:g} {self.currency}/{self.per}"


class Hyperparameters(_Strict):
    rounds: Annotated[int, Field(ge=1, le=10_000)]
    local_epochs: Annotated[int, Field(ge=1, le=1_000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.01
    optimizer: Optimizer = "sgd"
    # None: every participant must return results in every round.
    min_participants: Annotated[int, Field(ge=1)] | None = None
    # A round that takes longer fails (the rest of the run carries on only if enough sites
    # answered); None lets the initializer pick one from the data sizes.
    round_timeout_s: Annotated[float, Field(ge=5, le=86_400)] | None = None


class Resources(_Strict):
    # The study's minimum for a training VM: 2 vCPUs and 4 GiB unless the job says otherwise.
    vcpus: Annotated[int, Field(ge=1, le=1024)] = 2
    memory_gib: Annotated[float, Field(gt=0, le=16_384)] = 4.0
    disk_gib: Annotated[float, Field(ge=0, le=1_048_576)] = 0.0


class Placement(_Strict):
    max_cost: MaxCost | None = None
    max_latency_ms: Annotated[float, Field(gt=0, le=60_000)] | None = None
    cost_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    # The search over the offers: "exact" enumerates the Pareto front, "nsga2" runs NSGA-II
    # (as the original study does) over the same space; `fedctl place --method` is the same.
    method: Literal["exact", "nsga2"] = "exact"
    # Run the aggregator on this offer ("cloud:region:instance_type") instead of the search's
    # choice: the model still predicts its round time and cost beside the baseline's.
    offer: Annotated[str, Field(pattern=r"^[a-z0-9-]+:[a-z0-9-]+:[A-Za-z0-9._-]+$")] | None = None
    # Local training and evaluation seconds per round on a participant's VM, as measured (e.g.
    # by `python -m fedsky.shared.flower.calibrate` on the job's model and data); None: the
    # model's documented default.
    train_s: Annotated[float, Field(ge=0, le=86_400)] | None = None
    eval_s: Annotated[float, Field(ge=0, le=86_400)] | None = None


class JobSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")]
    participants: Annotated[list[str], Field(min_length=1, max_length=1024)]
    model: Path
    dataset: DatasetName
    dataset_overrides: dict[str, DatasetName] = {}
    hyperparameters: Hyperparameters
    resources: Resources = Resources()
    placement: Placement = Placement()
    selection_metric: SelectionMetric = DEFAULT_SELECTION_METRIC

    @field_validator("participants")
    @classmethod
    def _participants(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in value:
            try:
                check_agent_id(name)
            except InvalidIdError as exc:
                raise ValueError(str(exc)) from None
            if name in seen:
                raise ValueError(f"participant {name!r} is listed twice")
            seen.add(name)
        return value

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, (info.context or {}).get("config_dir"))

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        unknown = sorted(set(self.dataset_overrides) - set(self.participants))
        if unknown:
            raise ValueError(
                f"dataset_overrides names {', '.join(unknown)}, not among the participants"
            )
        minimum = self.hyperparameters.min_participants
        if minimum is not None and minimum > len(self.participants):
            raise ValueError(
                f"hyperparameters.min_participants is {minimum} but the job has only "
                f"{len(self.participants)} participant(s)"
            )
        return self

    @property
    def min_participants(self) -> int:
        """Participants that must return results in each round."""
        return self.hyperparameters.min_participants or len(self.participants)

    def dataset_for(self, participant: str) -> str:
        """The dataset name a participant resolves locally."""
        return self.dataset_overrides.get(participant, self.dataset)

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and isinstance(data.get("placement"), dict):
            cost = self.placement.max_cost
            data["placement"]["max_cost"] = str(cost) if cost is not None else None
        return data


def parse_job_spec(data: dict[str, Any], *, path: Path) -> JobSpec:
    """Validate already-parsed spec data; relative paths resolve against `path`'s directory.

    The model file's existence is not checked here (a spec received by the controller names a
    file uploaded beside it); `load_job_spec` checks it.
    """
    return parse_config(JobSpec, data, path=path)


def _yaml_without_aliases(text: str) -> Any:
    """YAML as plain data, refusing aliases: a spec has no use for them, and a few hundred bytes
    of nested aliases expand to gigabytes once anything walks the data."""
    import yaml  # type: ignore[import-untyped]

    class NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a job spec", event.start_mark
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader)


def load_job_spec_data(
    text: str, *, path: Path, fmt: Literal["toml", "yaml"] | None = None
) -> dict[str, Any]:
    """Spec text (TOML, or YAML by `fmt` or the file name's suffix) as a table, not yet checked."""
    kind = fmt or ("yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml")
    data: Any
    if kind == "yaml":
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: YAML job specs need PyYAML; write the spec as TOML"
            ) from None
        try:
            data = _yaml_without_aliases(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec must be a table of keys (got {type(data).__name__})")
    return data


def parse_job_spec_text(
    text: str, *, path: Path, fmt: Literal["toml", "yaml"] | None = None
) -> JobSpec:
    """Parse spec text (TOML, or YAML by `fmt` or the file name's suffix)."""
    return parse_job_spec(load_job_spec_data(text, path=path, fmt=fmt), path=path)


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file (TOML, or YAML by suffix)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job spec: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: a job spec must be UTF-8 text") from None
    spec = parse_job_spec_text(text, path=path)
    if not spec.model.is_file():
        raise ConfigError(f"{path}: key 'model': model file not found: {spec.model}")
    return spec
