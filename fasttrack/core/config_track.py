"""Config sections that never change an artifact: experiment tracking and sweeps.

No stage's spec reads them, so they are in no stage key: the same config tracked to MLflow, or
run as one point of a sweep, reuses the very artifacts of an untracked run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fasttrack.core.config_base import Section


class MlflowConfig(Section):
    uri: str = Field(
        description="Tracking server URL (http://host:5000), or a local `sqlite:///` / file URI."
    )
    experiment: str = Field("fasttrack", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(
        None,
        description="Model-registry name of the promoted model (when the gates pass); "
        "default: the run name.",
    )
    timeout_s: float = Field(
        3.0, gt=0, le=60, description="Per-request timeout; a tracker that is down is skipped."
    )


class TensorboardConfig(Section):
    dir: str = Field(description="Folder of TensorBoard event files (one subfolder per stage).")


class TrackingConfig(Section):
    """Where runs are logged; both optional. Tracking never decides a stage's output."""

    mlflow: MlflowConfig | None = None
    tensorboard: TensorboardConfig | None = None


class RandomSpace(Section):
    """A continuous range to sample (random mode): uniform, or log-uniform with `log: true`."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> RandomSpace:
        if self.low >= self.high:
            raise ValueError("low must be smaller than high")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class SweepConfig(Section):
    """`fasttrack sweep`: points over config fields (the paths `--set` accepts, e.g. dpo.beta,
    adapter.lora.r). grid: every combination of the listed values; random: `samples` points
    drawn with `seed` from lists (a choice) or {low, high, log} ranges."""

    mode: Literal["grid", "random"] = "grid"
    params: dict[str, list[Any] | RandomSpace] = Field(default_factory=dict)
    samples: int = Field(4, gt=0, le=1000, description="Points drawn in random mode.")
    seed: int = 0
    metric: str | None = Field(
        None, description="Column of the comparison table that picks the best point."
    )
    goal: Literal["max", "min", "auto"] = Field(
        "auto", description="auto: min for loss/perplexity-like metrics, else max."
    )
    max_parallel: int = Field(1, ge=1, le=64, description="Points run at once.")

    @field_validator("params")
    @classmethod
    def _nonempty(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name, values in params.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"{name}: no values")
        return params

    @model_validator(mode="after")
    def _grid_has_lists(self) -> SweepConfig:
        if self.mode == "grid":
            ranges = [n for n, v in self.params.items() if isinstance(v, RandomSpace)]
            if ranges:
                raise ValueError(f"params.{ranges[0]}: a range needs mode: random (grid: a list)")
        return self
