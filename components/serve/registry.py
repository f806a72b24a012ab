"""The MLflow model registry side of serving: registering an exported VLM checkpoint (its plain files,
logged as artifacts of the serving run) as a new version of a registered model (resolving a
`models:/` URI back to a folder is `components.common.model_registry`, which the data stage's captioner
shares). Only files are moved; nothing is unpickled.

A version links what it came from (`lineage`): its tags name the training step, its cache key, the run
that trained it and the pipeline run (never an absolute path), and its description (Markdown, shown on
the Models page) names the same runs and holds the stage's evaluation scores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from components.common.cache import MANIFEST, Manifest

ALIAS = "latest-pipeline"  # points at the version the last pipeline run deployed


def lineage(entry: Path, eval_entry: Path | None, pipeline_run_id: str = "") -> tuple[dict[str, str], str]:
    """The tags and the description of a version exported by the cache entry `entry`
    (`<cache>/<step>/<key>/`), with the scores of `eval_entry` when that evaluation step read this very
    entry (its cache key material names it); else the description says no evaluation is linked."""
    manifest = read_manifest(entry)
    step, key = manifest.component if manifest else entry.parent.name, manifest.cache_key if manifest else entry.name
    tags = {"stage": step, "checkpoint_key": key}
    if manifest is not None and manifest.run_id:
        tags["trained_by_run_id"] = manifest.run_id
    if pipeline_run_id:
        tags["pipeline_run_id"] = pipeline_run_id
    lines = [f"Trained by step `{step}` (cache key `{key}`"
             + (f", MLflow run `{manifest.run_id}`" if manifest and manifest.run_id else "") + ")"
             + (f"; last deployed by pipeline run `{pipeline_run_id}`." if pipeline_run_id else ".")]
    evaluation = read_manifest(eval_entry) if eval_entry is not None else None
    if evaluation is None or evaluation.key_material.get("inputs", {}).get("vlm") != key:
        lines.append("\nNo evaluation of this checkpoint is linked (its evaluation step was off or evaluated "
                     "another one).")
        return tags, "\n".join(lines)
    tags["eval_step"] = evaluation.component
    if evaluation.run_id:
        tags["eval_run_id"] = evaluation.run_id
    lines.append(f"\nEvaluation by step `{evaluation.component}`"
                 + (f" (MLflow run `{evaluation.run_id}`)" if evaluation.run_id else "") + ", on held-out items:\n")
    from components.common.report import split_modes

    for mode, metrics in split_modes(evaluation.metrics).items():
        lines.append(f"\nAnswering in {mode} mode:\n" if mode else "")
        lines.append(scores_markdown(metrics))
    return tags, "\n".join(lines)


def scores_markdown(metrics: Mapping[str, float]) -> str:
    """`eval/`, `eval_untrained/` and `eval_shuffled/` scores as one Markdown table (item counts left out)."""
    from components.common.report import EVAL_VARIANTS, is_count

    columns = [(prefix, label) for prefix, label in EVAL_VARIANTS if any(k.startswith(prefix + "/") for k in metrics)]
    names = sorted({key.split("/", 1)[1] for key in metrics if "/" in key and key.split("/", 1)[0] in dict(columns)})
    rows = ["| metric | " + " | ".join(label for _, label in columns) + " |", "|---|" + "---:|" * len(columns)]
    for metric in (n for n in names if not is_count(n)):
        cells = [f"{metrics[f'{prefix}/{metric}']:.3f}" if f"{prefix}/{metric}" in metrics else "-"
                 for prefix, _ in columns]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_manifest(entry: Path | None) -> Manifest | None:
    if entry is None or not (entry / MANIFEST).is_file():
        return None
    return Manifest.from_file(entry / MANIFEST)


def register_checkpoint(tracking_uri: str, run_id: str, folder: Path, name: str,
                        tags: dict[str, str], description: str = "") -> tuple[str, bool]:
    """Log `folder` as the run's `model` artifacts and register them as a new version of `name` (created
    when absent), unless a version tagged with the same `checkpoint_key` (the producing step's cache key)
    exists: then that version is reused (its description and tags brought up to date: the latest pipeline
    run and evaluation) and nothing is uploaded again. The alias `latest-pipeline` moves to the version. Returns (version, whether it is new)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    key = tags.get("checkpoint_key", "")
    if key:
        for existing in client.search_model_versions(f"name = '{name}'"):
            if existing.tags.get("checkpoint_key") == key and existing.status == "READY":
                if description:
                    client.update_model_version(name, existing.version, description=description)
                for tag, value in tags.items():
                    client.set_model_version_tag(name, existing.version, tag, value)
                client.set_registered_model_alias(name, ALIAS, existing.version)
                return str(existing.version), False
    client.log_artifacts(run_id, str(folder), "model")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    try:
        client.create_registered_model(name, description="Seed1.5-VL recipe VLM checkpoints (safetensors + "
                                       "Hugging Face LLM folder); serve with python -m components.serve.deploy")
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=description or None).version
    client.set_registered_model_alias(name, ALIAS, version)
    return str(version), True
