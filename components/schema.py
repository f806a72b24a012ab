"""The root config schema and the profile loader: base.yaml -> profile -> experiments -> --set."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from components.common.config import ConfigError, LayeredDict, build, parse_override, read_yaml
from components.data.config import DataConfig
from components.serve.config import ServeConfig
from components.vit.config import VitEvalConfig, VitPretrainConfig
from components.vlm.config import VlmConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


@dataclasses.dataclass
class TrainConfig:
    vit_pretrain: VitPretrainConfig = dataclasses.field(default_factory=VitPretrainConfig)
    vit_eval: VitEvalConfig = dataclasses.field(default_factory=VitEvalConfig)
    vlm: VlmConfig = dataclasses.field(default_factory=VlmConfig)


@dataclasses.dataclass
class RunSettings:
    root: str = "runs"  # artifacts, cache and the MLflow store; relative paths are taken from the cwd
    seed: int = 0
    name: str = ""  # MLflow parent run name; empty: "<profile>-<timestamp>"


@dataclasses.dataclass
class RaySettings:
    address: str = ""  # empty: RAY_ADDRESS if set (e.g. under `ray job submit`), else a local Ray
    num_cpus: int | None = None  # local Ray only
    include_dashboard: bool = True


@dataclasses.dataclass
class MlflowSettings:
    tracking_uri: str = ""  # empty: sqlite:///<run.root>/mlflow.db
    experiment: str = "seed-vl"
    artifact_location: str = ""  # empty: <run.root>/mlartifacts


@dataclasses.dataclass
class PipelineConfig:
    profile: str = "tiny"
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    ray: RaySettings = dataclasses.field(default_factory=RaySettings)
    mlflow: MlflowSettings = dataclasses.field(default_factory=MlflowSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)

    @property
    def root(self) -> Path:
        return Path(self.run.root).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        """Where new experiments keep artifacts: the configured location; '' for a tracking server, which
        then decides (`mlflow-artifacts:/` when it proxies them, `--serve-artifacts`); else a local folder."""
        if self.mlflow.artifact_location:
            return self.mlflow.artifact_location
        if self.tracking_uri.startswith(("http://", "https://")):
            return ""
        return (self.root / "mlartifacts").as_uri()


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def layer_path(kind: str, name: str) -> Path:
    """`configs/<kind>/<name>.yaml`, or `name` itself when it is a path to a YAML file."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no {kind[:-1]} named {name!r}: choose one of {available(kind)} or give a YAML path")
    return path


def profile_chain(path: Path) -> list[tuple[Path, dict]]:
    """A profile and the profiles it `extends` (a top-level key naming another profile), base first."""
    chain: list[tuple[Path, dict]] = []
    while True:
        values = read_yaml(path)
        parent = values.pop("extends", None)
        chain.insert(0, (path, values))
        if parent is None:
            return chain
        if not isinstance(parent, str):
            raise ConfigError(f"{_shown(path)}: 'extends' must name a profile, got {parent!r}")
        path = layer_path("profiles", parent)
        if any(seen == path for seen, _ in chain):
            raise ConfigError(f"{_shown(path)}: profiles extend each other in a cycle")


def load_config(
    profile: str = "tiny",
    experiments: list[str] | None = None,
    overrides: list[str] | None = None,
) -> tuple[PipelineConfig, LayeredDict]:
    """Resolve the layers in order; later layers win. Returns the typed config and its layers."""
    layered = LayeredDict()
    layered.merge(read_yaml(CONFIG_DIR / "base.yaml"), "configs/base.yaml")
    profile_path = layer_path("profiles", profile)
    layered.merge({"profile": profile_path.stem}, str(_shown(profile_path)))
    for path, values in profile_chain(profile_path):
        layered.merge(values, str(_shown(path)))
    for experiment in experiments or []:
        path = layer_path("experiments", experiment)
        layered.merge(read_yaml(path), str(_shown(path)))
    env_root = os.environ.get("SEEDVL_RUN_ROOT")
    if env_root:
        layered.merge({"run": {"root": env_root}}, "$SEEDVL_RUN_ROOT")
    # Not MLflow's own MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() exports that one to the process.
    env_tracking = os.environ.get("SEEDVL_TRACKING_URI")
    if env_tracking:
        layered.merge({"mlflow": {"tracking_uri": env_tracking}}, "$SEEDVL_TRACKING_URI")
    for override in overrides or []:
        layered.merge(parse_override(override), f"--set {override}")
    config = build(PipelineConfig, layered)
    for captions in (config.data.image_captions, config.data.video_captions):
        if captions.enabled and not captions.registry_uri:  # the captioner's models:/ names: the pipeline's own registry
            captions.registry_uri = config.tracking_uri
    check_cross_fields(config, layered)
    check_vlm(config, layered)
    return config, layered


def check_cross_fields(config: PipelineConfig, layered: LayeredDict) -> None:
    """Rules that span sections, checked at load like the rest."""
    clip = config.data.clip_filter
    if clip.enabled and not clip.weights and not config.data.clip_scorer.enabled:
        raise ConfigError(
            f"{layered.source_of('data.clip_filter.weights')}: 'data.clip_filter.weights' is empty: set it to a "
            "local open_clip checkpoint for data.clip_filter.architecture, or set data.clip_scorer.enabled=true "
            "to train a small scorer, or data.clip_filter.enabled=false")
    if clip.enabled and clip.mode == "calibrated" and not config.data.clip_scorer.enabled:
        raise ConfigError("'data.clip_filter.mode' = 'calibrated' needs data.clip_scorer.enabled=true "
                          "(use mode threshold or fraction with your own weights)")


    vit = config.train.vit_pretrain
    if vit.enabled:
        for key, value in (("teacher.weights", vit.teacher.weights), ("text.weights", vit.text.weights)):
            if value == "scorer" and not config.data.clip_scorer.enabled:
                raise ConfigError(f"{layered.source_of('train.vit_pretrain.' + key)}: 'train.vit_pretrain.{key}' is "
                                  "'scorer' but data.clip_scorer is disabled: give a local open_clip checkpoint "
                                  "path, or set data.clip_scorer.enabled=true")
        if vit.text.freeze and not vit.text.weights:
            raise ConfigError(f"{layered.source_of('train.vit_pretrain.text.freeze')}: 'train.vit_pretrain.text.freeze' "
                              "is true but text.weights is empty, which would lock a random text tower: give "
                              "text.weights (a checkpoint path or 'scorer') or set text.freeze=false")
        if vit.mim.enabled and not vit.teacher.weights:
            raise ConfigError(f"{layered.source_of('train.vit_pretrain.teacher.weights')}: "
                              "'train.vit_pretrain.teacher.weights' is empty, so MIM would distil a random "
                              "teacher: give a local open_clip checkpoint for teacher.architecture, use "
                              "'scorer', or set train.vit_pretrain.mim.enabled=false")


def check_vlm(config: PipelineConfig, layered: LayeredDict) -> None:
    vlm = config.train.vlm
    stages = [name for name in ("stage0", "stage1", "stage2") if getattr(vlm, name).enabled]
    if stages and not vlm.llm.pretrained_path and not vlm.llm_pretrain.enabled:
        raise ConfigError(f"{layered.source_of('train.vlm.llm_pretrain.enabled')}: train.vlm.{stages[0]} needs an LLM "
                          "but 'train.vlm.llm.pretrained_path' is empty and train.vlm.llm_pretrain is disabled: give a "
                          "local Hugging Face MoE folder in train.vlm.llm.pretrained_path, or enable llm_pretrain")
    vit = config.train.vit_pretrain
    if stages and not vit.enabled:
        raise ConfigError(f"{layered.source_of('train.vit_pretrain.enabled')}: train.vit_pretrain is disabled but the VLM "
                          f"stages ({', '.join(stages)}) start from its Seed-ViT: enable it, or disable "
                          "train.vlm.stage0/stage1/stage2 (enabled=false)")
    if stages and vit.enabled and vlm.holdout_fraction > vit.holdout_fraction:
        raise ConfigError(f"{layered.source_of('train.vlm.holdout_fraction')}: 'train.vlm.holdout_fraction' "
                          f"({vlm.holdout_fraction}) exceeds train.vit_pretrain.holdout_fraction ({vit.holdout_fraction}), "
                          "so the ViT would pretrain on pictures the VLM evaluation holds out: make it <= the ViT's")


def _shown(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path

