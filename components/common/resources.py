"""Per-stage compute resources and image: read at the call site, never part of a cache key."""

from __future__ import annotations

import dataclasses
from typing import Any

from components.common.placement import check_image_name, image_selector


@dataclasses.dataclass
class Resources:
    """How a Ray Data step is spread: tasks' CPUs, actor-pool size, rows per batch."""

    num_cpus: float = 1.0
    concurrency: int | None = None  # None: let Ray Data decide
    batch_size: int = 256
    runtime_env: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"env_vars": {...}}
    image: str = ""  # the infra/ image the stage runs in on a cluster (e.g. openseedvl-cpu); ignored locally

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ValueError(f"resources.num_cpus must be > 0, got {self.num_cpus}")
        if self.batch_size < 1:
            raise ValueError(f"resources.batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"resources.concurrency must be >= 1 or null, got {self.concurrency}")
        check_image_name(self.image)

    def label_selector(self) -> dict[str, str]:
        """The node labels the stage needs on a cluster that labels nodes by image; empty on a local Ray."""
        return image_selector(self.image)

    def placement_kwargs(self) -> dict[str, Any]:
        """`label_selector` for `ray.remote`/`.options`/`map_batches` when the stage is placed by image, else {}."""
        selector = self.label_selector()
        return {"label_selector": selector} if selector else {}

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ray.remote` of a stage that runs as one Ray task."""
        kwargs: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        return kwargs | self.placement_kwargs()

    def map_kwargs(self, actors: bool = False) -> dict[str, Any]:
        """Keyword arguments for `Dataset.map_batches`: CPUs per task or actor, and the pool as `compute`
        (a task pool capped at `concurrency`, or an actor pool of that size for callable classes)."""
        import ray.data

        kwargs: dict[str, Any] = {"num_cpus": self.num_cpus}
        if actors:
            kwargs["compute"] = ray.data.ActorPoolStrategy(size=self.concurrency or 1)
        elif self.concurrency is not None:
            kwargs["compute"] = ray.data.TaskPoolStrategy(size=self.concurrency)
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        return kwargs | self.placement_kwargs()
