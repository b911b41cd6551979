"""The one way a stage runs: key -> lookup -> lock -> build in staging -> publish (manifest last).

Every stage module declares itself once, `STAGE = Stage(name, version, **task_options)`, with a
spec function (what determines its output: `STAGE.spec(config, upstream, inputs)`) and a build
`(cfg, spec, out)` (how to produce the files); `STAGE.define(spec_fn, build)` gives the plain
function and the Prefect task. `run_stage` does the rest, so caching, locking, timings and
manifests behave identically in every stage. The task's cache policy consults the store, so
Prefect shows reuse as `Cached` and never hands out a ref to an artifact the store no longer holds.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.states import Completed

from fasttrack.core.errors import FastTrackError, StoreError
from fasttrack.core.integrity import checked_lookup
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactRef, ArtifactStore, compute_key

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# Part of every Prefect cache key: bumped when pickled results (ArtifactRef's module path) move,
# so Prefect never tries to unpickle a record written by an older layout of the package.
RESULTS = "fasttrack.core"
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class StageSpec:
    """Everything that determines a stage's output; its key is a hash of all of it."""

    stage: str
    version: str  # bump when the stage's behaviour changes
    config: dict[str, Any]
    upstream: dict[str, ArtifactRef] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # content hashes of external inputs

    @functools.cached_property
    def key(self) -> str:
        ups = {name: ref.key for name, ref in self.upstream.items()}
        return compute_key(self.stage, self.version, self.config, ups, self.inputs)


@dataclass
class BuildResult:
    """What a build function reports besides the files it wrote."""

    metrics: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest fields (e.g. protocol)


Build = Callable[[Path], BuildResult]
SpecFn = Callable[..., StageSpec]
# name -> spec function of every stage module imported so far (filled by `stage_task`), so the
# library can compute any step's key (the model chain, lookups) without importing a stage module.
SPECS: dict[str, SpecFn] = {}


def stage_spec(name: str) -> SpecFn:
    """The spec function of stage `name` (its module must have been imported: `import tasks`)."""
    if name not in SPECS:
        raise RuntimeError(f"stage {name!r} is not registered; import the `tasks` package first")
    return SPECS[name]


def run_stage(
    store: ArtifactStore, spec: StageSpec, build: Build, force: bool = False
) -> ArtifactRef:
    """Return the artifact for `spec`, building and publishing it only when the store lacks it."""
    log = get_logger()
    if not force and (ref := checked_lookup(store, spec.stage, spec.key)) is not None:
        log.info("%s: reusing %s", spec.stage, ref.short)
        return ref
    try:
        with store.lock(spec.stage, spec.key):
            # Re-checked under the lock: someone may have published meanwhile, and a corrupt
            # artifact is quarantined here (never while another process may be rebuilding it).
            ref = checked_lookup(store, spec.stage, spec.key, fix=True)
            if not force and ref is not None:
                log.info("%s: %s was published meanwhile; reusing it", spec.stage, ref.short)
                return ref
            store.clean_tmp()
            started = time.time()
            log.info("%s: building %s", spec.stage, spec.key[:12])
            ref = _build_and_publish(store, spec, build, force, started)
    except OSError as exc:
        if (clear := storage_error(store, f"{spec.stage} {spec.key[:12]}", exc)) is None:
            raise
        raise clear from exc
    shutil.rmtree(store.work_dir(spec.stage, spec.key), ignore_errors=True)  # checkpoints
    log.info("%s: published %s in %.1fs", spec.stage, ref.short, time.time() - started)
    return ref


def storage_error(store: ArtifactStore, what: str, exc: OSError) -> StoreError | None:
    """The one-line error for a full disk anywhere, or a store that cannot be written (read-only
    mount, no permission: only for paths inside the store); None for any other OSError."""
    path = exc.filename or f"{store.scratch} or {store.url}"
    if exc.errno in _DISK_FULL:
        return StoreError(
            f"{what}: no space left on device (disk full) writing {path}; nothing was published: "
            "free space and re-run"
        )
    inside = exc.filename and str(exc.filename).startswith((str(store.scratch), str(store.root)))
    if exc.errno in _READ_ONLY and inside:
        return StoreError(
            f"{what}: the store {store.url} is not writable ({exc.strerror}): cannot write "
            f"{exc.filename}; building needs a writable store (reading works read-only)"
        )
    return None


def _build_and_publish(
    store: ArtifactStore, spec: StageSpec, build: Build, force: bool, started: float
) -> ArtifactRef:
    with store.staging(spec.stage, spec.key) as out:
        result = build(out)
        finished = time.time()
        return store.publish(
            spec.stage,
            spec.key,
            out,
            replace=force,
            version=spec.version,
            config=spec.config,
            upstream={name: up.key for name, up in spec.upstream.items()},
            inputs=spec.inputs,
            metrics=result.metrics,
            device=result.device or {"device": "cpu"},
            timings={
                "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "seconds": round(finished - started, 3),
            },
            **result.extra,
        )


class StoreCachePolicy(CachePolicy):
    """Prefect cache key = the artifact key *and* the identity of the published artifact.

    Returns no key when the store lacks an intact artifact (missing, incomplete or failing its
    hashes, see fasttrack/core/integrity.py: so the task runs and quarantines it), and folds the
    manifest's `created_at`/host into the key so a republished artifact (forced, quarantined and
    rebuilt) can never be answered with an older Prefect result record.
    """

    def __init__(self, spec_fn: Callable[..., StageSpec]):
        super().__init__()
        self.spec_fn = spec_fn

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: Any, **kw: Any):
        if inputs.get("force"):
            return None
        args = {k: v for k, v in inputs.items() if k != "force"}
        try:
            spec = self.spec_fn(**args)
        except FastTrackError:
            return None  # the task itself will raise the same error, cleanly
        store = ArtifactStore(args["cfg"].store)
        try:
            manifest = store.read_manifest(spec.stage, spec.key)
            if manifest is None or checked_lookup(store, spec.stage, spec.key) is None:
                return None
        except StoreError:  # corrupt or symlinked: the task quarantines it or says why not
            return None
        identity = f"{RESULTS}:{spec.key}:{manifest.get('created_at')}:{manifest.get('host')}"
        return f"fasttrack-{spec.stage}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retries help I/O hiccups and killed training (resume), never a bad config or file."""
    try:
        state.result()
    except FastTrackError:
        return False
    except Exception:
        return True
    return True


def link_artifact(ref: ArtifactRef) -> None:
    """A Prefect link artifact per published artifact (stable key per stage: UI history)."""
    from prefect.artifacts import create_link_artifact

    from fasttrack.core.progress import in_prefect_run

    if not in_prefect_run():  # `.fn()` calls in tests and scripts: nothing to attach to
        return
    uri = ref.uri if "://" in ref.uri else Path(ref.uri).resolve().as_uri()
    shown = ", ".join(f"{k}={v}" for k, v in list(ref.metrics.items())[:6])
    create_link_artifact(
        link=uri,
        link_text=f"{ref.stage} {ref.key[:12]}",
        key=f"fasttrack-artifact-{ref.stage.replace('_', '-')}",
        description=f"{ref.stage} artifact {ref.key[:12]}: {shown}"[:500],
    )


def stage_task(spec_fn: Callable[..., StageSpec], **task_options: Any):
    """Wrap a stage function `fn(cfg, *refs, force=False) -> ArtifactRef` as a Prefect task.

    A ref found in the store comes back as a `Cached` state, so Prefect shows every reuse the same
    way whether it was answered by Prefect's record or by the store.
    """

    SPECS[task_options["name"]] = spec_fn

    def decorate(fn: Callable[..., ArtifactRef]):
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any):
            ref = fn(*args, **kwargs)
            if ref.reused:
                return Completed(data=ref, name="Cached")
            link_artifact(ref)
            return ref

        options = {
            "persist_result": True,
            "cache_policy": StoreCachePolicy(spec_fn),
            "retry_condition_fn": _retry_unless_user_error,
        }
        return task(run, **{**options, **task_options})

    return decorate


StageBuild = Callable[[Any, StageSpec, Path], BuildResult]  # build(cfg, spec, out)
Executor = Callable[..., BuildResult]  # executor(cfg, stage, build, cfg, spec, out)


class Stage:
    """A stage declared once: its name, code version and Prefect task options.

    Its spec function makes keys with `STAGE.spec(config, upstream, inputs)`; `STAGE.define(spec_fn,
    build)` returns the plain function `fn(cfg, *refs, force=False)` (the parameters of `spec_fn`)
    and its Prefect task. Every build takes `(cfg, spec, out)`; `executor` runs it elsewhere
    (training stages: a killable child process, see fasttrack/lib/training.train_stage).
    """

    def __init__(self, name: str, version: str, **task_options: Any):
        self.name, self.version, self.task_options = name, version, task_options

    def spec(
        self,
        config: dict[str, Any],
        upstream: dict[str, ArtifactRef] | None = None,
        inputs: dict[str, str] | None = None,
    ) -> StageSpec:
        return StageSpec(self.name, self.version, config, upstream or {}, inputs or {})

    def define(
        self, spec_fn: SpecFn, build: StageBuild, executor: Executor | None = None
    ) -> tuple[Callable[..., ArtifactRef], Any]:
        signature = inspect.signature(spec_fn)
        force = inspect.Parameter("force", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)
        full = signature.replace(
            parameters=[*signature.parameters.values(), force], return_annotation=ArtifactRef
        )

        def run(*args: Any, **kwargs: Any) -> ArtifactRef:
            bound = full.bind(*args, **kwargs)
            bound.apply_defaults()
            forced = bound.arguments.pop("force")
            spec, cfg = spec_fn(**bound.arguments), bound.arguments["cfg"]

            def make(out: Path) -> BuildResult:
                if executor is None:
                    return build(cfg, spec, out)
                return executor(cfg, self.name, build, cfg, spec, out)

            return run_stage(ArtifactStore(cfg.store), spec, make, forced)

        run.__signature__ = full  # type: ignore[attr-defined]  # Prefect's task parameters
        run.__name__ = run.__qualname__ = self.name
        run.__module__ = spec_fn.__module__
        run.__doc__ = f"The {self.name} stage (plain function): {(build.__doc__ or '').strip()}"
        return run, stage_task(spec_fn, name=self.name, **self.task_options)(run)
