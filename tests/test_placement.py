"""Placement by image: a stage's `resources.image` becomes a Ray node-label selector on a cluster whose
nodes carry `openseedvl.io/image` labels (as cluster/ sets them), and is ignored on a local Ray. Runs a
real one-node Ray labelled like a GPU worker of cluster/raycluster.yaml."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from components.common.config import ConfigError
from components.common.placement import IMAGE_LABEL, image_selector
from components.common.resources import Resources
from components.serve.app import deployment_options


def test_without_ray_or_image_nothing_is_selected() -> None:
    import ray

    ray.shutdown()  # whatever an earlier test module left running in this process
    assert image_selector("openseedvl-gpu") == {}  # e.g. config loading, a local run before Ray starts
    assert "label_selector" not in Resources(image="openseedvl-gpu").task_kwargs()


def test_an_image_reference_is_refused_with_the_fix() -> None:
    from components.schema import load_config

    with pytest.raises(ConfigError, match="without registry or tag.*openseedvl-gpu"):
        load_config("tiny", overrides=["train.vit_pretrain.resources.image=registry.example.com/openseedvl-gpu:0.1.0"])
    with pytest.raises(ConfigError, match="without registry or tag"):
        load_config("tiny", overrides=["serve.resources.image=openseedvl-serve:latest"])


@pytest.fixture(scope="module")
def labelled_ray() -> Iterator[None]:
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, labels={IMAGE_LABEL: "openseedvl-gpu"},
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def test_on_a_labelled_cluster_stages_go_to_nodes_of_their_image(labelled_ray: None) -> None:
    import ray
    import ray.data

    def where() -> dict[str, str]:  # defined here so that it is pickled by value, not imported by the worker
        return ray.get_runtime_context().get_node_labels()

    gpu = Resources(num_cpus=1, image="openseedvl-gpu")
    assert gpu.task_kwargs()["label_selector"] == {IMAGE_LABEL: "openseedvl-gpu"}
    assert ray.get(ray.remote(**gpu.task_kwargs())(where).remote())[IMAGE_LABEL] == "openseedvl-gpu"
    rows = ray.data.range(4).map_batches(lambda batch: batch, batch_size=2, **gpu.map_kwargs()).take_all()
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]

    cpu = Resources(num_cpus=1, image="openseedvl-cpu")  # no node runs it: the task waits for one
    waiting = ray.remote(**cpu.task_kwargs())(where).remote()
    ready, _ = ray.wait([waiting], timeout=3)
    assert ready == []
    ray.cancel(waiting, force=True)

    anywhere = Resources(num_cpus=1)  # no image named: no selector, runs anywhere
    assert "label_selector" not in anywhere.task_kwargs()
    assert ray.get(ray.remote(**anywhere.task_kwargs())(where).remote())


def test_serve_replicas_follow_their_image(labelled_ray: None) -> None:
    from components.schema import load_config

    placed, _ = load_config("tiny", overrides=["serve.resources.image=openseedvl-gpu"])
    model, ingress = deployment_options(placed.serve)
    assert model["ray_actor_options"]["label_selector"] == {IMAGE_LABEL: "openseedvl-gpu"}
    assert ingress["ray_actor_options"]["label_selector"] == {IMAGE_LABEL: "openseedvl-gpu"}
    anywhere, _ = load_config("tiny")
    model, ingress = deployment_options(anywhere.serve)
    assert "label_selector" not in model["ray_actor_options"] and "label_selector" not in ingress["ray_actor_options"]
