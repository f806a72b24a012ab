"""The ViT pretraining step end to end on shards built here: Ray Train + DeepSpeed (ZeRO-2, gloo, two
workers), a worker killed mid-phase and resumed from its checkpoint, a corrupt sample skipped and
counted, the exported checkpoints loadable without the training stack, and retrieval evaluated."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from components.common.executor import run_into
from components.data.synthetic_crawl import random_scene, render
from components.training.config import DeepSpeedSettings
from components.vit.config import PhaseConfig, SeedViTConfig, TeacherConfig, TextTowerConfig, VitPretrainConfig
from components.training.runtime import read_log
from components.vit.vit_pretrain import vit_pretrain

pytestmark = pytest.mark.e2e


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def jpeg(image) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def build_shards(folder: Path) -> None:
    """Two caption shards (one sample with corrupt image bytes) and one video shard of 4-frame clips."""
    rng = random.Random(0)
    for shard in range(2):
        (folder / "caption").mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / "caption" / f"shard-{shard:06d}.tar", "w") as tar:
            for index in range(20):
                key = f"s{shard}_{index:03d}"
                scene = random_scene(rng, rng.randint(120, 220), rng.randint(120, 220))
                image = b"\xff\xd8 not a jpeg" if (shard, index) == (0, 5) else jpeg(render(scene))
                add(tar, f"{key}.jpg", image)
                add(tar, f"{key}.txt", scene.caption().encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "task": "caption", "caption": scene.caption()}).encode())
    (folder / "video").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "video" / "shard-000000.tar", "w") as tar:
        for index in range(4):
            key, scene = f"v{index:03d}", random_scene(rng, 160, 120)
            for frame in range(4):
                add(tar, f"{key}.frame{frame:04d}.jpg", jpeg(render(scene).rotate(frame * 5)))
            add(tar, f"{key}.txt", f"a clip of {scene.caption()}".encode())
            add(tar, f"{key}.json", json.dumps({"key": key, "task": "video"}).encode())


def random_scorer(folder: Path) -> Path:
    """A randomly initialised tiny open_clip model saved as the scorer step saves it (teacher and text tower)."""
    from safetensors.torch import save_file

    from components.common.clip_model import load_clip

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = load_clip("seedvl-tiny-clip").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def small_config(fail_at_step: int = -1) -> VitPretrainConfig:
    return VitPretrainConfig(
        vit=SeedViTConfig(width=32, depth=2, num_heads=2, min_pixels=3136, max_pixels=6272),
        embed_dim=16,
        teacher=TeacherConfig(architecture="seedvl-tiny-clip", weights="scorer"),
        text=TextTowerConfig(architecture="seedvl-tiny-clip", weights="scorer"),
        mim=PhaseConfig(steps=4, images_per_batch=4, learning_rate=1e-3, warmup_steps=1),
        siglip=PhaseConfig(steps=6, images_per_batch=8, learning_rate=1e-3, warmup_steps=1),
        video=PhaseConfig(steps=2, images_per_batch=2, learning_rate=1e-3, warmup_steps=1, frames_per_clip=2),
        holdout_fraction=0.2, num_workers=2, use_gpu=False, checkpoint_every=3, max_failures=1,
        deepspeed=DeepSpeedSettings(zero_stage=2), fail_at_step=fail_at_step,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vit_inputs")
    build_shards(root / "shards")
    return {"shards": root / "shards", "scorer": random_scorer(root / "scorer")}


def run_step(inputs: dict[str, Path], folder: Path, config: VitPretrainConfig) -> dict[str, float]:
    result, _ = run_into(vit_pretrain, config, inputs, folder, seed=0)
    return result.metrics


def test_killed_worker_resumes_and_matches_uninterrupted(local_ray: None, inputs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    plain = run_step(inputs, tmp_path / "plain", small_config())
    killed = run_step(inputs, tmp_path / "killed", small_config(fail_at_step=8))  # mid-SigLIP; checkpoint at 7

    assert plain["restarts"] == 0 and killed["restarts"] == 1
    log = read_log(tmp_path / "killed" / "vit" / "train_log.jsonl")
    assert [r["global_step"] for r in log.steps] == list(range(1, 13))
    for phase in ("mim", "siglip", "video"):
        assert plain[f"{phase}_steps"] == killed[f"{phase}_steps"]
        assert killed[f"{phase}_loss_last"] == pytest.approx(plain[f"{phase}_loss_last"], rel=0.02)
    final_plain = load_file(str(tmp_path / "plain" / "vit" / "video" / "vit.safetensors"))
    final_killed = load_file(str(tmp_path / "killed" / "vit" / "video" / "vit.safetensors"))
    for name, tensor in final_plain.items():
        assert torch.allclose(tensor, final_killed[name], atol=1e-4, rtol=1e-3), name

    # the corrupt sample was met, skipped and counted; nothing else was lost
    assert plain["siglip_samples_corrupt_image"] >= 1
    assert plain["siglip_samples_kept"] == 6 * 8 * 2
    assert not (tmp_path / "plain" / "ray_train").exists()  # Ray Train's checkpoints are removed at the end


def test_exports_load_without_training_stack_and_retrieval_runs(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    from components.vit.preprocess import image_to_patches, pack
    from components.vit.pretrain_model import load_exported
    from components.vit.vit_eval import run_eval

    folder = tmp_path_factory.getbasetemp()
    plain = next(folder.rglob("plain/vit"), None)
    if plain is None:
        pytest.skip("needs the training run of the test above")
    for name in ("initial", "mim", "siglip", "video"):
        model, saved = load_exported(plain / name)
        assert saved["phase"] == name and saved["vit"]["width"] == 32
    packed = pack([image_to_patches(render(random_scene(random.Random(1), 140, 90)), model.vit.config)])
    with torch.inference_mode():
        embedding = model.encode_images(packed.pixel_values, packed.grid_hw)
    assert embedding.shape == (1, 16) and torch.isclose(embedding.norm(), torch.tensor(1.0))

    results = run_eval(str(inputs["shards"]), str(plain), max_pairs=50, threads=1)
    assert results["pairs"] >= 5 and set(results) >= {"chance", "initial", "mim", "siglip", "video"}
    assert 0.0 <= results["siglip"]["i2t_r1"] <= results["siglip"]["i2t_r5"] <= 1.0


def test_zero3_trains_the_same_weights_as_zero2(local_ray: None, inputs: dict[str, Path],
                                               tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import dataclasses

    from safetensors.torch import load_file

    plain = next(tmp_path_factory.getbasetemp().rglob("plain/vit"), None)
    if plain is None:
        pytest.skip("needs the ZeRO-2 training run of the first test")
    config = dataclasses.replace(small_config(), deepspeed=DeepSpeedSettings(zero_stage=3))
    metrics = run_step(inputs, tmp_path / "zero3", config)  # parameters partitioned, gathered for export
    assert metrics["restarts"] == 0 and metrics["video_steps"] == 2
    zero2 = load_file(str(plain / "video" / "vit.safetensors"))
    zero3 = load_file(str(tmp_path / "zero3" / "vit" / "video" / "vit.safetensors"))
    for name, tensor in zero2.items():
        assert torch.allclose(tensor, zero3[name], atol=1e-4, rtol=1e-3), name
