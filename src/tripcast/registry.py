"""The MLflow model registry: versions, the ``champion`` / ``challenger`` aliases, the promotion policy,
rollback and an audit trail.

Every decision is written as tags on the version it concerns (``promotion.*``), and the registered model
keeps ``champion_history`` (JSON list of versions, oldest first) so that ``rollback`` knows where to go back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import AbstractContextManager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tripcast import locks
from tripcast.config import Settings
from tripcast.errors import ModelVerificationError, RegistryError
from tripcast.models import TripDurationPipeline, verify
from tripcast.tracking import mlflow_client

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
FLOW_RUN_TAG = "tripcast.flow_run"  # the Prefect flow run that registered a version: its re-runs find it
OUTCOME_TAG = "tripcast.outcome"  # what that run's decision step returned (JSON), for a re-run to return again
HISTORY_KEEP = 50
TRAFFIC, TRAFFIC_KEYS = "traffic", ("mode", "weight", "id", "kind")  # registered-model tags: traffic.mode, ...


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    challenger_rmse: float
    champion_rmse: float | None
    baseline_rmse: float
    margin: float

    def as_tags(self) -> dict[str, str]:
        tags = {f"promotion.{k}": ("" if v is None else str(v)) for k, v in asdict(self).items() if k != "promote"}
        tags["promotion.decision"] = "promoted" if self.promote else "rejected"
        tags["promotion.at"] = _now()
        return tags


def decide(challenger_rmse: float, champion_rmse: float | None, baseline_rmse: float,
           margin: float, rows: int | None = None, min_rows: int = 0) -> PromotionDecision:
    """Promote only if the challenger beats the rule baseline and beats the champion, on the same
    validation rows (at least ``min_rows`` of them), by ``margin`` (relative: 0.01 = 1 % lower RMSE)."""
    args = dict(challenger_rmse=challenger_rmse, champion_rmse=champion_rmse, baseline_rmse=baseline_rmse,
                margin=margin)
    if rows is not None and rows < min_rows:
        return PromotionDecision(False, f"validated on {rows:,} rides, fewer than {min_rows:,}: too few to "
                                        "promote on", **args)
    if not challenger_rmse < baseline_rmse:
        return PromotionDecision(False, f"RMSE {challenger_rmse:.4f} does not beat the rule baseline "
                                        f"{baseline_rmse:.4f}", **args)
    if champion_rmse is None:
        return PromotionDecision(True, f"no champion yet; RMSE {challenger_rmse:.4f} beats the rule baseline "
                                       f"{baseline_rmse:.4f}", **args)
    needed = champion_rmse * (1 - margin)
    if challenger_rmse <= needed:
        return PromotionDecision(True, f"RMSE {challenger_rmse:.4f} beats champion {champion_rmse:.4f} by more "
                                       f"than {margin:.1%} and the rule baseline {baseline_rmse:.4f}", **args)
    return PromotionDecision(False, f"RMSE {challenger_rmse:.4f} does not beat champion {champion_rmse:.4f} "
                                    f"by {margin:.1%} (needs <= {needed:.4f})", **args)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.client: MlflowClient = mlflow_client(settings)
        # Downloads name their store: MLflow's global URI is the last Registry's, not necessarily this one's.
        self._uris = {"tracking_uri": settings.resolved_tracking_uri, "registry_uri": settings.resolved_tracking_uri}

    # --- reading -------------------------------------------------------------------------------------
    def version(self, version: str | int) -> ModelVersion:
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise RegistryError(f"{self.name} has no version {version}") from None

    def resolve(self, version_or_alias: str | int) -> ModelVersion | None:
        key = str(version_or_alias)
        return self.version(key) if key.isdigit() else self.by_alias(key)

    def current(self, alias: str) -> str | None:
        """The version number an alias points at, as a string (MLflow returns ints or strings)."""
        mv = self.by_alias(alias)
        return None if mv is None else str(mv.version)

    def by_alias(self, alias: str) -> ModelVersion | None:
        """The version behind ``alias``; None if the alias (or the model) does not exist. A registry that does
        not answer is an error, not "no version": serving must say it cannot see the registry."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            # Not the store's URL: it may hold a password, and /ready shows this message to anyone.
            raise RegistryError(f"could not read the alias {alias!r} from the registry: {str(exc)[:300]}") from None

    def registered_by(self, flow_run: str) -> ModelVersion | None:
        """The version an earlier attempt of ``flow_run`` registered (a run re-run after its worker died)."""
        return next((v for v in self.versions() if v.tags.get(FLOW_RUN_TAG) == flow_run), None)

    def versions(self) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self) -> dict[str, str]:
        try:
            return {alias: str(v) for alias, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException:
            return {}

    def history(self) -> list[str]:
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]

    def load_pipeline(self, alias_or_version: str) -> tuple[ModelVersion, TripDurationPipeline]:
        """The pipeline of a version (by number or alias), read from its artifacts without pyfunc, and only
        once it has passed verification (``tripcast.models.verify``); ModelVerificationError if it does not."""
        mv = self.resolve(alias_or_version)
        if mv is None:
            raise RegistryError(f"{self.name} has no version with alias {alias_or_version!r}; train one first "
                                "(tripcast train) or promote one (tripcast models promote VERSION)")
        return mv, self.verified_pipeline(mv)

    def verified_pipeline(self, mv: ModelVersion) -> TripDurationPipeline:
        """Digests as training recorded them, a load in a separate process, then the predictions training
        recorded, before the pipeline is returned. Failing any: ModelVerificationError naming the version."""
        version = str(mv.version)
        try:
            if not mv.run_id:
                raise ModelVerificationError("it has no training run: nothing to check it against")
            recorded = self.recorded_digests(mv)
            reference = self._reference(mv, recorded)
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(f"models:/{self.name}/{version}", dst_path=tmp,
                                                            **self._uris)
                folder = Path(local) / "artifacts" / verify.PIPELINE_ARTIFACT
                found = verify.pipeline_digests(folder)
                if recorded is not None:
                    verify.check_digests({k: v for k, v in recorded.items()
                                          if k.startswith(verify.PIPELINE_ARTIFACT + "/")}, found)
                verify.check_once_in_subprocess(folder, found, reference, self.settings.verify_timeout_seconds,
                                                self.settings.home / "verified")
                pipeline = TripDurationPipeline.load(folder)
            verify.check_predictions(pipeline, pd.read_parquet(reference))
        except ModelVerificationError as exc:
            raise type(exc)(f"{self.name} version {version} failed verification: {exc}") from None
        return pipeline

    def recorded_digests(self, mv: ModelVersion) -> dict[str, str] | None:
        """What training recorded of the version's files; None (and a warning) for versions logged before."""
        run = self.client.get_run(mv.run_id) if mv.run_id else None
        recorded = verify.recorded_digests(run.data.tags) if run is not None else None
        if recorded is None:
            log.warning("%s version %s has no recorded digests (logged by an earlier tripcast): it is checked by "
                        "its predictions only", self.name, mv.version)
        return recorded

    def reference_path(self, mv: ModelVersion) -> Path:
        """The version's reference rides with the predictions recorded at training (monitoring's baseline and
        verification's), cached under TRIPCAST_HOME and checked against its recorded digest."""
        return self._reference(mv, self.recorded_digests(mv))

    def _reference(self, mv: ModelVersion, recorded: dict[str, str] | None) -> Path:
        expected = (recorded or {}).get(verify.REFERENCE_ARTIFACT)
        path = self.settings.home / "references" / f"{self.name}-v{mv.version}.parquet"
        if path.exists() and (expected is None or verify.sha256(path) == expected):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=verify.REFERENCE_ARTIFACT,
                                                            dst_path=tmp, **self._uris)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise ModelVerificationError(f"{verify.REFERENCE_ARTIFACT} is missing") from None
            if expected is not None and verify.sha256(Path(local)) != expected:
                raise ModelVerificationError(f"{verify.REFERENCE_ARTIFACT} is not the file training logged (its "
                                             "SHA-256 differs)")
            os.replace(local, path)
        return path

    def training_period(self, mv: ModelVersion) -> tuple[datetime, datetime] | None:
        """When the rides a version was trained on were picked up: [start, end); None if not recorded."""
        tags = self.client.get_run(mv.run_id).data.tags if mv.run_id else {}
        if "tripcast.train_start" in tags:
            return (datetime.fromisoformat(tags["tripcast.train_start"]),
                    datetime.fromisoformat(tags["tripcast.train_end"]))
        label = tags.get("tripcast.train_month", "")  # versions logged before the period was recorded
        if ".." in label:
            start, end = label.split("..")
            return datetime.fromisoformat(start), datetime.fromisoformat(end)
        if len(label) == 7:
            year, month = int(label[:4]), int(label[5:])
            return datetime(year, month, 1), datetime(year + month // 12, month % 12 + 1, 1)
        return None

    # --- the traffic an experiment asks of serving ------------------------------------------------------
    def traffic(self) -> dict[str, str] | None:
        """What serving should do beside answering with the champion, as the running experiment (or guard)
        recorded it on the registered model: ``{"mode", "weight", "id", "kind"}``; None when none runs. Every API
        worker and replica reads it at each poll, as it reads the alias."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"could not read the registered model's tags: {str(exc)[:300]}") from None
        if f"{TRAFFIC}.mode" not in tags:
            return None
        return {key: tags[f"{TRAFFIC}.{key}"] for key in TRAFFIC_KEYS if f"{TRAFFIC}.{key}" in tags}

    def set_traffic(self, version: str, traffic: dict[str, str]) -> None:
        """``version`` behind ``challenger``, in the mode (and at the weight) of ``traffic``."""
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        for key in TRAFFIC_KEYS:
            if key in traffic:
                self.client.set_registered_model_tag(self.name, f"{TRAFFIC}.{key}", str(traffic[key]))

    def clear_traffic(self) -> None:
        """No experiment: serving answers with the champion alone, and shadows nothing."""
        for key in TRAFFIC_KEYS:
            with suppress(MlflowException):  # not set
                self.client.delete_registered_model_tag(self.name, f"{TRAFFIC}.{key}")
        if self.current(CHALLENGER) is not None:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)

    def decision_lock(self) -> AbstractContextManager[None]:
        """Held around read-champion -> decide -> apply, so that concurrent runs decide one at a time."""
        return locks.exclusive(f"registry-{self.name}", self.settings)

    # --- writing -------------------------------------------------------------------------------------
    def register(self, model_uri: str, run_id: str, tags: dict[str, str] | None = None) -> ModelVersion:
        """A new version, aliased ``challenger`` until a decision is taken."""
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        mv = self.client.create_model_version(self.name, source=model_uri, run_id=run_id,
                                              tags=(tags or {}) | {"run_id": run_id}, model_id=model_id)
        self.client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return mv

    def apply(self, version: str | int, decision: PromotionDecision) -> ModelVersion:
        """Record the decision; promoted, the version becomes champion; rejected, it stops being challenger
        (the alias names a version still to be decided, or in an experiment)."""
        version = str(version)
        self.record(version, decision.as_tags())
        if decision.promote:
            self._make_champion(version)
        else:
            self._drop_challenger(version)
        return self.version(version)

    def abandon(self, version: str, why: str) -> None:
        """A version whose decision was never taken (its run interrupted or failed): said so, and not left behind
        ``challenger``."""
        self.record(version, {"promotion.decision": "interrupted", "promotion.reason": why})
        self._drop_challenger(version)

    def record(self, version: str, tags: dict[str, str]) -> None:
        """Tags on the version; a decision with its reason is also the version's description, which the MLflow
        UI shows."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, str(value)[:4000])
        if "promotion.decision" in tags:
            self.client.update_model_version(self.name, version, description=(
                f"{tags['promotion.decision']}: {tags.get('promotion.reason', '')}".strip(": ")[:4000]))

    def _drop_challenger(self, version: str) -> None:
        if self.current(CHALLENGER) == version:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)

    def promote(self, version: str | int, reason: str = "manual promotion") -> ModelVersion:
        """An operator's promotion: the version must pass verification (serving would refuse it anyway)."""
        mv = self.version(version)
        self.verified_pipeline(mv)
        version = str(mv.version)
        with self.decision_lock():
            self.promote_locked(version, reason)
        return self.version(version)

    def promote_locked(self, version: str, reason: str, tags: dict[str, str] | None = None) -> None:
        """Make ``version`` champion, with its reason and ``tags``; the caller holds ``decision_lock()`` and has
        verified the version."""
        self.record(version, {"promotion.decision": "promoted", "promotion.reason": reason, "promotion.at": _now()}
                    | (tags or {}))
        self._make_champion(version)

    def rollback(self) -> tuple[str, str]:
        """Move ``champion`` back to the previous champion, which must pass verification; returns (from_version,
        to_version)."""
        with self.decision_lock():
            return self.rollback_locked()

    def rollback_locked(self, tags: dict[str, str] | None = None) -> tuple[str, str]:
        """``rollback``, with ``tags`` on the version rolled back from; the caller holds ``decision_lock()``."""
        history = self.history()
        current = self.current(CHAMPION)
        if current is not None and (not history or history[-1] != current):
            history.append(current)  # the alias was moved outside tripcast (e.g. in the MLflow UI)
        if current is None or len(history) < 2:
            raise RegistryError(f"{self.name} has no previous champion to roll back to")
        history.pop()
        target = history[-1]
        self.verified_pipeline(self.version(target))
        self.client.set_registered_model_alias(self.name, CHAMPION, target)
        self.client.set_model_version_tag(self.name, current, "rollback.at", _now())
        self.client.set_model_version_tag(self.name, current, "rollback.to", target)
        self.client.set_model_version_tag(self.name, target, "rollback.restored_at", _now())
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(self.name, current, key, value)
        self._save_history(history)
        return current, target

    def _make_champion(self, version: str) -> None:
        previous = self.current(CHAMPION)
        if previous == version:
            return
        if previous is not None:
            self.client.set_model_version_tag(self.name, version, "promotion.previous_champion", previous)
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        if self.current(CHALLENGER) == version:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        self._save_history((self.history() + [version])[-HISTORY_KEEP:])

    def _save_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))


def rolled_back(mv: ModelVersion, champion: str | None) -> bool:
    """Whether a version's last word is a rollback away from it (not so if it is champion again, or was
    promoted since)."""
    at = mv.tags.get("rollback.at")
    return at is not None and str(mv.version) != champion and at >= mv.tags.get("promotion.at", "")
