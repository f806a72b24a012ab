"""Reading our own checkpoints back out of the MLflow model registry: what a model reference
(`models:/<name>/<version>`, `models:/<name>@<alias>`, or a local folder) names, as a local folder
(`resolve_model`, downloading a registry version once) and as cache-key material (`model_identity`,
which changes when an alias moves or a folder's files change). Serving hosts what it resolves; the data
stage's captioner captions with it. Registering versions is the serving step's (`components.serve.registry`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    folder: Path  # a local checkpoint folder `load_vlm` reads
    name: str  # registered model name ('' for a plain folder)
    version: str  # registered version ('' for a plain folder)

    @property
    def label(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else str(self.folder)


def is_model_uri(source: str) -> bool:
    return MODEL_URI.match(source) is not None


def registered_version(source: str, tracking_uri: str) -> Any:
    """The MLflow `ModelVersion` a `models:/` URI names (an alias resolved now). Errors say what was looked
    for and how to fix it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = MODEL_URI.match(source)
    if match is None:
        raise ValueError(f"{source!r} is not a models:/<name>/<version> or models:/<name>@<alias> URI")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        return (client.get_model_version(match["name"], match["version"]) if match["version"]
                else client.get_model_version_by_alias(match["name"], match["alias"]))
    except MlflowException as error:
        raise FileNotFoundError(f"{source}: not in the model registry at {tracking_uri} ({error.message}); list the "
                                "versions in the MLflow UI (Models tab) or with MlflowClient().search_model_versions()"
                                ) from error


def model_identity(source: str, tracking_uri: str) -> dict[str, Any]:
    """What a model reference names now, as cache-key material without paths that move: a registry URI by
    the version it resolves to and that version's `checkpoint_key` tag (the producing step's cache key), a
    folder by its files' relative names, sizes and mtimes."""
    if is_model_uri(source):
        found = registered_version(source, tracking_uri)
        return {"uri": source, "version": str(found.version), "checkpoint_key": found.tags.get("checkpoint_key", ""),
                "run_id": found.run_id or ""}
    folder = Path(source).expanduser()
    files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
    return {"folder_files": [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def resolve_model(source: str, tracking_uri: str, download_dir: Path) -> ResolvedModel:
    """A registry URI downloaded to `download_dir/<name>/<version>` (reused when already there), or a
    local export folder as it is. Errors say what was looked for and how to fix it."""
    if not is_model_uri(source):
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{source!r} is neither a models:/<name>/<version> URI nor an exported VLM folder "
                                    "(one with config.json, vit.safetensors, adapter.safetensors and llm/)")
        return ResolvedModel(folder.resolve(), "", "")
    import mlflow

    found = registered_version(source, tracking_uri)
    name = found.name
    target = download_dir / name / str(found.version)
    if not target.is_dir():  # download beside it, then rename: a killed download leaves no half folder
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(staging),
                                                tracking_uri=tracking_uri)
            staging.replace(target)
        except OSError:
            if not target.is_dir():  # not a concurrent download of the same version that won the rename
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    folder = target / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{source}: version {found.version}'s files ({found.source}) are not an exported VLM")
    return ResolvedModel(folder, name, str(found.version))
