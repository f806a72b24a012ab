"""Where a stage runs on a cluster: the container image its config names (`resources.image`), turned
into a Ray node-label selector when the cluster's nodes carry image labels, and nothing on a local Ray.

Each worker group in cluster/ (KubeRay `labels`, the launcher's node-type `labels`) labels its Ray nodes
`openseedvl.io/image=<image name>` for the infra/ image it runs (`openseedvl-cpu`, `openseedvl-gpu`,
`openseedvl-serve`). A stage that names an image is then scheduled only on such nodes. A local Ray (or
any cluster whose nodes carry no such label) ignores the image: the stage runs where Ray puts it."""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

IMAGE_LABEL = "openseedvl.io/image"
# A Kubernetes / Ray label value: the image's name, without registry or tag.
IMAGE_NAME = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?)?$")


def check_image_name(image: str) -> None:
    """Raise ValueError with the fix when `image` cannot be a node-label value."""
    if not IMAGE_NAME.match(image):
        raise ValueError(f"image {image!r} is not an image name usable as a Ray node label: give the name alone, "
                         "without registry or tag (e.g. openseedvl-gpu for registry.example.com/openseedvl/"
                         "openseedvl-gpu:0.1.0), or '' to run anywhere")


def cluster_labels_images() -> bool:
    """Whether the connected Ray cluster has a live node labelled with an image (never true for a local Ray
    started by the pipeline, nor when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return False
    return any(IMAGE_LABEL in (node.get("Labels") or {}) for node in ray.nodes() if node.get("Alive"))


def image_selector(image: str) -> dict[str, str]:
    """`label_selector` for the tasks, actors or Train workers of a stage that runs in `image`: empty when
    no image is named or the cluster does not label its nodes by image (a local run)."""
    if not image:
        return {}
    if not cluster_labels_images():
        log.debug("no Ray node is labelled %s: running without placement by image %s", IMAGE_LABEL, image)
        return {}
    return {IMAGE_LABEL: image}
