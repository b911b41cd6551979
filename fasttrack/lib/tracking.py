"""Experiment tracking: a pipeline run mirrored to MLflow and/or TensorBoard, never decided by it.

One MLflow parent run per pipeline run and one nested run per step, executed or cached (a cached
step is tagged `fasttrack.status=cached` and carries the metrics and curves of the manifest it
reused, so every point of a sweep shows complete curves). Params are the step's keyed config
(the manifest's `config`), metrics its manifest metrics, curves every logged step of the
training history the child process recorded (`log_history.json`, written by the Trainer), and
tags link the artifact (key, store URL) instead of copying it. The promoted model is registered
in MLflow's model registry with the artifact's URL as its source. TensorBoard gets one event-file
folder per step under `<dir>/<run>/<step>`.

A tracker that is down costs one short probe and one warning; the run goes on and its metrics
stay in the manifests. Nothing here is read by a stage spec, so tracking is in no key.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactRef, ArtifactStore

HISTORY = "log_history.json"  # written by fasttrack/lib/training.run_trainer
_MAX_PARAM = 6000  # MLflow's param value limit
_BATCH = 100  # MLflow's params/tags per log_batch


@dataclass
class StepInfo:
    """What the tracker needs of a finished step (flows/runner.py's StepRecord + its ref)."""

    step: str
    ref: ArtifactRef
    status: str  # executed | cached
    seconds: float


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b.c` keys; lists kept whole (JSON), so a config reads like `--set`."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): obj}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite-number metrics (MLflow metrics are floats; flags and strings become params)."""
    return {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    }


def history(store: ArtifactStore, ref: ArtifactRef) -> list[dict[str, Any]]:
    """The Trainer's log history stored in a training artifact ([] for other stages)."""
    path = store.local_path(ref) / HISTORY
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def reachable(uri: str, timeout_s: float) -> str | None:
    """None when an http(s) tracking server answers /health, else why not (one short probe)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"/health answered {resp.status}"
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


class Tracker:
    """Mirror one pipeline run to the configured trackers; every call is safe when off/down."""

    def __init__(self, cfg: RunConfig, label: str | None = None):
        self.cfg, self.store = cfg, ArtifactStore(cfg.store)
        self.label = label or cfg.name
        self.log = get_logger()
        self.client: Any = None
        self.parent: str | None = None
        self.tb_root: Path | None = None
        if cfg.tracking.tensorboard:
            self.tb_root = Path(cfg.tracking.tensorboard.dir) / _safe(self.label)
        if cfg.tracking.mlflow:
            self._guard(self._start_mlflow)

    @property
    def mlflow_on(self) -> bool:
        return self.parent is not None

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run a tracking call; the first failure warns once and turns MLflow off."""
        try:
            return fn(*args)
        except Exception as exc:  # a tracker never fails a run
            self._off(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            return None

    def _off(self, why: str) -> None:
        if self.cfg.tracking.mlflow and (self.client is not None or self.parent is None):
            uri = self.cfg.tracking.mlflow.uri
            self.log.warning("tracking: MLflow at %s is unavailable (%s); the run goes on, "
                             "its metrics stay in the store's manifests", uri, why)  # fmt: skip
        self.client, self.parent = None, None

    def _start_mlflow(self) -> None:
        ml = self.cfg.tracking.mlflow
        assert ml is not None
        # MLflow retries a failed request for minutes by default; a tracker must not stall a run.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(ml.timeout_s, 1))))
        if (why := reachable(ml.uri, ml.timeout_s)) is not None:
            self.client = object()  # so _off warns
            self._off(why)
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=ml.uri)
        found = self.client.get_experiment_by_name(ml.experiment)
        exp = found.experiment_id if found else self.client.create_experiment(ml.experiment)
        tags = {"mlflow.runName": self.label, "fasttrack.config": self.cfg.name,
                "fasttrack.store": self.store.url}  # fmt: skip
        self.parent = self.client.create_run(exp, tags=tags).info.run_id
        self.experiment = exp
        params = flatten(self.cfg.model_dump(mode="json", exclude={"tracking"}))
        self._log(self.parent, params=params)

    def _log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        curves: list[tuple[str, float, int]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, _param(v)) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        ms = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
        ms += [Metric(k, v, now, step) for k, v, step in curves or []]
        for i in range(0, max(len(ps), len(ts), 1), _BATCH):
            self.client.log_batch(run_id, params=ps[i : i + _BATCH], tags=ts[i : i + _BATCH])
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i : i + 1000])

    # ---- what the flow reports ------------------------------------------------------------
    def step(self, info: StepInfo) -> None:
        """A finished step: a nested MLflow run and a TensorBoard folder."""
        if not self.mlflow_on and self.tb_root is None:
            return
        manifest = self._manifest(info.ref)
        curves = curve_points(history(self.store, info.ref))
        metrics = numeric(info.ref.metrics or manifest.get("metrics", {}))
        metrics["step_seconds"] = info.seconds
        if self.mlflow_on:
            self._guard(self._mlflow_step, info, manifest, metrics, curves)
        if self.tb_root is not None:
            try:
                self._tb_step(info, manifest, metrics, curves)
            except Exception as exc:  # e.g. an unwritable folder: never fails a run
                self.log.warning("tracking: TensorBoard %s: %s", info.step, exc)

    def _manifest(self, ref: ArtifactRef) -> dict[str, Any]:
        try:
            return self.store.read_manifest(ref.stage, ref.key) or {}
        except Exception:
            return {}

    def _mlflow_step(self, info: StepInfo, manifest: dict, metrics: dict, curves: list) -> None:
        tags = {
            "mlflow.parentRunId": self.parent,
            "mlflow.runName": info.step,
            "fasttrack.status": info.status,
            "fasttrack.stage": info.ref.stage,
            "fasttrack.key": info.ref.key,
            "fasttrack.artifact": _link(info.ref),
            "fasttrack.store": self.store.url,
        }
        run = self.client.create_run(self.experiment, tags=tags).info.run_id
        params = flatten(manifest.get("config", {}))
        self._log(run, params=params, metrics=metrics, curves=curves)
        self.client.set_terminated(run, "FINISHED")

    def _tb_step(self, info: StepInfo, manifest: dict, metrics: dict, curves: list) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(self.tb_root / _safe(info.step))) as writer:
            for name, value, step in curves:
                writer.add_scalar(name, value, step)
            for name, value in metrics.items():
                writer.add_scalar(f"final/{name}", value, 0)
            config = json.dumps(manifest.get("config", {}), indent=2, sort_keys=True)
            writer.add_text("config", f"{info.status} {info.ref.key}\n\n```\n{config}\n```")

    def table(self, rows: list[dict[str, Any]]) -> None:
        """The evaluation table on the parent run: `<model>.<metric>`."""
        flat = {f"{r.get('model')}.{k}": v for r in rows for k, v in r.items() if k != "model"}
        if self.mlflow_on:
            self._guard(self._log, self.parent, None, numeric(flat))

    def register(self, promoted: dict[str, Any] | None) -> None:
        """Register the promoted model (gates passed) under `mlflow.registered_model`."""
        if not promoted or not self.mlflow_on:
            return
        try:
            self._register(promoted)
        except Exception as exc:  # the registry is optional on a server: the runs stay logged
            self.log.warning("tracking: MLflow model registry: %s", str(exc).splitlines()[0])

    def _register(self, promoted: dict[str, Any]) -> None:
        ml = self.cfg.tracking.mlflow
        assert ml is not None
        name = ml.registered_model or self.cfg.name
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        ref = ArtifactRef(stage=promoted["stage"], key=promoted["promoted"], uri=promoted["uri"])
        tags = {"fasttrack.stage": ref.stage, "fasttrack.key": ref.key}
        self.client.create_model_version(
            name, source=registry_source(ref), run_id=self.parent, tags=tags,
            description=f"{ref.stage} {ref.key[:12]} promoted by run {self.cfg.name}",
        )  # fmt: skip

    def end(self, ok: bool) -> None:
        if self.mlflow_on:
            self._guard(self.client.set_terminated, self.parent, "FINISHED" if ok else "FAILED")


@contextmanager
def tracked(cfg: RunConfig, label: str | None = None) -> Iterator[Tracker]:
    """A Tracker for the duration of a run; its parent run ends FINISHED, or FAILED on error."""
    tracker = Tracker(cfg, label)
    try:
        yield tracker
    except BaseException:
        tracker.end(ok=False)
        raise
    tracker.end(ok=True)


def curve_points(hist: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(name, value, step) for every numeric value the Trainer logged, e.g. train/loss."""
    out = []
    for entry in hist:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for name, value in entry.items():
            if name in ("step", "epoch") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and value == value:
                split = "eval" if name.startswith("eval_") else "train"
                out.append((f"{split}/{name.removeprefix('eval_')}", float(value), step))
    return out


def registry_source(ref: ArtifactRef) -> str:
    """The model version's source: the artifact's URL; for a local store `fasttrack-store:` +
    path, because an MLflow server refuses a local path outside the run's own artifact folder
    (it would need a copy; the tag `fasttrack.artifact` keeps the file:// link)."""
    link = _link(ref)
    return "fasttrack-store:" + link.removeprefix("file://") if link.startswith("file:") else link


def _link(ref: ArtifactRef) -> str:
    return ref.uri if "://" in ref.uri else Path(ref.uri).resolve().as_uri()


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_PARAM]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
