"""Tests of the vision-language model (components/vlm/model.py) on tiny random models: image features
spliced at the `<|image_pad|>` tokens, the packed answer loss (equal to per-sample losses, images
included), the router's balancing loss, freezing, the shuffled-image control, greedy decoding with a
KV cache against a plain loop, export/load as plain files, and building the LLM families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.common.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

from components.vit.config import SeedViTConfig  # noqa: E402
from components.vit.model import SeedViT  # noqa: E402
from components.vlm.config import LlmConfig  # noqa: E402
from components.vlm.conversation import IGNORE_INDEX, EncodedSample, encode_sample, prompt_ids  # noqa: E402
from components.vlm.data import image_token_count, images_to_vit_input  # noqa: E402
from components.vlm.model import (  # noqa: E402
    EXPORT_ARCHITECTURE,
    VisionLanguageModel,
    answer_loss,
    build_llm,
    export_vlm,
    load_vlm,
    set_trainable,
)
from components.vlm.packing import Packer, build_pack, collate  # noqa: E402
from components.vlm.tokenizer import SpecialIds, train_tokenizer  # noqa: E402

VIT_CONFIG = SeedViTConfig(width=32, depth=2, num_heads=2, min_pixels=3136, max_pixels=12544)


def _corpus() -> list[str]:
    colors, shapes, places = ("red", "blue", "green", "purple"), ("circle", "square", "triangle"), ("white", "black")
    texts = [f"a {c} {s} on a {p} background" for c in colors for s in shapes for p in places]
    texts += [f"How many {c} {s}s are there? {n}" for c in colors for s in shapes for n in range(4)]
    texts += ["Describe the image.", "What is shown in this picture?", "Read all the text in the image.",
              "<box>[733, 79, 793, 156]</box>", "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"]
    return texts * 3


def llm_config(**overrides: Any) -> LlmConfig:
    sizes = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                 moe_intermediate_size=64, num_experts=4, experts_per_token=2, vocab_size=400,
                 max_position_embeddings=1024)
    return LlmConfig(**(sizes | overrides))


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer(_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def ids(tok: Any) -> SpecialIds:
    return SpecialIds.of(tok)


def make_model(tok: Any, seed: int = 0, position_buckets: int = 0, position_frequencies: int = 0,
               **overrides: Any) -> VisionLanguageModel:
    torch.manual_seed(seed)
    special = SpecialIds.of(tok)
    llm = build_llm(llm_config(**overrides), vocab_size=len(tok), pad_id=special.pad)
    return VisionLanguageModel(SeedViT(VIT_CONFIG), llm, special.image_pad, adapter_position_buckets=position_buckets,
                               adapter_position_frequencies=position_frequencies).eval()


@pytest.fixture(scope="module")
def model(tok: Any) -> VisionLanguageModel:
    """Shared and never modified by a test (tests that train or freeze build their own)."""
    return make_model(tok)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text_ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def vision_run(ids: SpecialIds, count: int) -> list[int]:
    return [ids.vision_start, *[ids.image_pad] * count, ids.vision_end]


def two_image_prompt(tok: Any, ids: SpecialIds, counts: list[int]) -> list[int]:
    return ([ids.im_start, *text_ids(tok, "user\nWhat is in")] + vision_run(ids, counts[0])
            + text_ids(tok, " and in ") + vision_run(ids, counts[1]) + text_ids(tok, " ?") + [ids.im_end])


# ---------------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------------


def test_embed_writes_image_features_at_placeholders_in_order(tok: Any, ids: SpecialIds,
                                                              model: VisionLanguageModel) -> None:
    images = [noise_image(56, 56, 1), noise_image(84, 56, 2)]  # 4 and 6 pooled tokens
    counts = [image_token_count(image, VIT_CONFIG) for image in images]
    assert counts == [4, 6]
    input_ids = torch.tensor([two_image_prompt(tok, ids, counts)])
    packed = images_to_vit_input(images, VIT_CONFIG)
    with torch.no_grad():
        embeds = model.embed(input_ids, packed.pixel_values, packed.grid_hw)
        plain = model.llm.get_input_embeddings()(input_ids)
        alone = [model.image_embeddings(p.pixel_values, p.grid_hw)
                 for p in (images_to_vit_input([image], VIT_CONFIG) for image in images)]
    slots = (input_ids[0] == ids.image_pad).nonzero().flatten()
    assert len(slots) == sum(counts)
    others = input_ids[0] != ids.image_pad
    assert torch.equal(embeds[0, others], plain[0, others])  # every other position: the plain embedding
    # the first run holds the first image's tokens, the second run the second's (each computed alone)
    torch.testing.assert_close(embeds[0, slots[:4]], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[0, slots[4:]], alone[1], atol=1e-5, rtol=1e-5)
    assert (embeds[0, slots] - plain[0, slots]).abs().max() > 1e-2  # the features did replace the pads
    assert (alone[0].mean(0) - alone[1].mean(0)).abs().max() > 1e-4  # the two images are distinguishable


def test_embed_rejects_placeholder_and_image_token_mismatch(tok: Any, ids: SpecialIds,
                                                            model: VisionLanguageModel) -> None:
    images = [noise_image(56, 56, 1), noise_image(84, 56, 2)]
    packed = images_to_vit_input(images, VIT_CONFIG)
    for counts in ([4, 5], [4, 7], [6, 4 + 1]):
        input_ids = torch.tensor([two_image_prompt(tok, ids, counts)])
        with pytest.raises(ValueError, match="placeholder"):
            model.embed(input_ids, packed.pixel_values, packed.grid_hw)
    no_slots = torch.tensor([text_ids(tok, "a red circle")])
    with pytest.raises(ValueError):
        model.embed(no_slots, packed.pixel_values, packed.grid_hw)  # images but no placeholders


def test_embed_rejects_placeholders_without_images(tok: Any, ids: SpecialIds, model: VisionLanguageModel) -> None:
    input_ids = torch.tensor([two_image_prompt(tok, ids, [4, 6])])
    with pytest.raises(ValueError, match="no images"):
        model.embed(input_ids)
    with pytest.raises(ValueError, match="no images"):
        model.embed(input_ids, torch.zeros(0, VIT_CONFIG.patch_dim), torch.zeros(0, 2, dtype=torch.long))
    text_only = torch.tensor([text_ids(tok, "a red circle on a white background")])
    with torch.no_grad():
        assert torch.equal(model.embed(text_only), model.llm.get_input_embeddings()(text_only))


def test_image_order_permutes_whole_images(tok: Any, ids: SpecialIds, model: VisionLanguageModel) -> None:
    first, second = noise_image(84, 56, 3), noise_image(84, 56, 4)  # same size: 6 tokens each
    input_ids = torch.tensor([two_image_prompt(tok, ids, [6, 6])])
    given = images_to_vit_input([first, second], VIT_CONFIG)
    swapped = images_to_vit_input([second, first], VIT_CONFIG)
    with torch.no_grad():
        permuted = model.embed(input_ids, given.pixel_values, given.grid_hw, image_order=torch.tensor([1, 0]))
        reference = model.embed(input_ids, swapped.pixel_values, swapped.grid_hw)
        unpermuted = model.embed(input_ids, given.pixel_values, given.grid_hw)
        identity = model.embed(input_ids, given.pixel_values, given.grid_hw, image_order=torch.tensor([0, 1]))
    torch.testing.assert_close(permuted, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(identity, unpermuted, atol=1e-6, rtol=1e-6)
    assert (permuted - unpermuted).abs().max() > 1e-3  # control: the order matters


# ---------------------------------------------------------------------------------------------------
# answer_loss and forward
# ---------------------------------------------------------------------------------------------------


def test_answer_loss_is_shifted_and_counts_only_labelled_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    # position 0's label never counts (nothing predicts it); -100 elsewhere is skipped
    labels = torch.tensor([[4, 3, IGNORE_INDEX, 7, 2], [IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]])
    loss, count = answer_loss(logits, labels)
    pairs = [(0, 0, 3), (0, 2, 7), (0, 3, 2), (1, 1, 9)]  # (row, logits position t, label at t + 1)
    expected = sum(F.cross_entropy(logits[r, t][None], torch.tensor([y])) for r, t, y in pairs) / len(pairs)
    assert count == 4
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    unshifted = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert abs(float(loss) - float(unshifted)) > 1e-3  # control: the unshifted loss is another number


def test_answer_loss_without_labels_is_zero_and_differentiable() -> None:
    logits = torch.randn(1, 4, 7, requires_grad=True)
    for labels in (torch.full((1, 4), IGNORE_INDEX), torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])):
        loss, count = answer_loss(logits, labels)
        assert count == 0 and loss.item() == 0.0 and loss.dim() == 0
        loss.backward()  # stays in the graph, so a step with no answer tokens does not crash
        assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def _encoded_pair(tok: Any) -> tuple[list[EncodedSample], list[list[Image.Image]]]:
    images_a = [noise_image(56, 56, 5), noise_image(84, 56, 6)]
    images_b = [noise_image(60, 100, 7)]
    samples = []
    for key, images, turns in (
            ("a", images_a, [("<image>\nWhat is left of <image>?", "a red circle")]),
            ("b", images_b, [("<image>\nDescribe the image.", "a blue square on a white background"),
                             ("How many squares are there?", "1")])):
        samples.append(encode_sample(key=key, task="caption", turns=turns, tokenizer=tok, media=images,
                                     image_token_counts=[image_token_count(i, VIT_CONFIG) for i in images],
                                     max_tokens=256))
    return samples, [images_a, images_b]


def test_packed_forward_loss_equals_per_sample_losses(tok: Any, ids: SpecialIds, model: VisionLanguageModel) -> None:
    samples, _ = _encoded_pair(tok)
    packer = Packer(max_tokens=256, max_images=8, pad_id=ids.pad, buffer_size=4)
    for sample in samples:
        assert packer.add(sample) == []
    [pack] = packer.flush()
    assert [s.key for s in pack.samples] == ["a", "b"] and pack.num_padding > 0 and pack.num_images == 3
    batch = collate([pack])
    packed_images = images_to_vit_input(pack.media, VIT_CONFIG)
    with torch.no_grad():
        packed = model(batch["input_ids"], batch["position_ids"], batch["labels"],
                       packed_images.pixel_values, packed_images.grid_hw)
        total, tokens = 0.0, 0
        for sample in samples:
            alone_images = images_to_vit_input(sample.media, VIT_CONFIG)
            alone = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None],
                          torch.tensor([sample.labels]), alone_images.pixel_values, alone_images.grid_hw)
            total += float(alone.lm_loss) * alone.answer_tokens
            tokens += alone.answer_tokens
        # control: positions that do not restart let sample b attend to sample a
        leaky = model(batch["input_ids"], torch.arange(pack.num_tokens)[None], batch["labels"],
                      packed_images.pixel_values, packed_images.grid_hw)
    answer_tokens = sum(sum(1 for label in s.labels[1:] if label != IGNORE_INDEX) for s in samples)
    assert packed.answer_tokens == tokens == answer_tokens > 0
    assert abs(float(packed.lm_loss) - total / tokens) < 1e-5
    assert abs(float(leaky.lm_loss) - total / tokens) > 1e-4


def test_sample_and_square_reductions_weigh_each_sample_by_its_answer_tokens(
        tok: Any, ids: SpecialIds, model: VisionLanguageModel) -> None:
    samples, _ = _encoded_pair(tok)
    packer = Packer(max_tokens=256, max_images=8, pad_id=ids.pad, buffer_size=4)
    for sample in samples:
        packer.add(sample)
    [pack] = packer.flush()
    batch = collate([pack])
    packed_images = images_to_vit_input(pack.media, VIT_CONFIG)
    with torch.no_grad():
        losses = {reduction: model(batch["input_ids"], batch["position_ids"], batch["labels"],
                                   packed_images.pixel_values, packed_images.grid_hw, loss_reduction=reduction)
                  for reduction in ("token", "sample", "square")}
        alone = []
        for sample in samples:
            images = images_to_vit_input(sample.media, VIT_CONFIG)
            result = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None],
                           torch.tensor([sample.labels]), images.pixel_values, images.grid_hw)
            alone.append((float(result.lm_loss), result.answer_tokens))
    (loss_a, n_a), (loss_b, n_b) = alone
    trained = {name: float(r.loss - model.aux_loss_coef * r.aux_loss) for name, r in losses.items()}
    assert n_a != n_b
    assert abs(trained["sample"] - (loss_a + loss_b) / 2) < 1e-5
    square = (loss_a * n_a ** 0.5 + loss_b * n_b ** 0.5) / (n_a ** 0.5 + n_b ** 0.5)
    assert abs(trained["square"] - square) < 1e-5
    token = (loss_a * n_a + loss_b * n_b) / (n_a + n_b)
    assert all(abs(float(result.lm_loss) - token) < 1e-5 for result in losses.values())  # what is logged
    assert abs(trained["token"] - token) < 1e-5 and abs(token - (loss_a + loss_b) / 2) > 1e-4
    with pytest.raises(ValueError, match="unknown loss reduction"):
        model(batch["input_ids"], batch["position_ids"], batch["labels"], packed_images.pixel_values,
              packed_images.grid_hw, loss_reduction="mean")


def test_batch_of_packs_with_a_video_equals_per_sample_losses(tok: Any, ids: SpecialIds,
                                                             model: VisionLanguageModel) -> None:
    """Two packs in one batch (as the train loop stacks packs_per_step of them), a video among the samples:
    images of all packs go to the ViT in pack order, and the loss still equals the per-sample one."""
    samples, _ = _encoded_pair(tok)
    frames = [noise_image(56, 56, 20 + i) for i in range(3)]
    clip = encode_sample(key="v", task="video", turns=[("<video>\nDescribe the video.", "a red circle moves left")],
                         tokenizer=tok, media=frames,
                         image_token_counts=[image_token_count(f, VIT_CONFIG) for f in frames],
                         frame_timestamps=[0.5, 1.5, 2.5], max_tokens=256)
    assert clip.num_images == 3
    packs = [build_pack([samples[1]], 160, ids.pad), build_pack([clip, samples[0]], 160, ids.pad)]
    batch = collate(packs)
    images = images_to_vit_input([image for pack in packs for image in pack.media], VIT_CONFIG)
    with torch.no_grad():
        together = model(batch["input_ids"], batch["position_ids"], batch["labels"], images.pixel_values,
                         images.grid_hw)
        total, tokens = 0.0, 0
        for sample in (samples[1], clip, samples[0]):
            alone_images = images_to_vit_input(sample.media, VIT_CONFIG)
            alone = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None],
                          torch.tensor([sample.labels]), alone_images.pixel_values, alone_images.grid_hw)
            total += float(alone.lm_loss) * alone.answer_tokens
            tokens += alone.answer_tokens
    assert together.answer_tokens == tokens
    assert abs(float(together.lm_loss) - total / tokens) < 1e-5


def test_aux_loss_is_positive_and_added_with_its_coefficient(tok: Any) -> None:
    model = make_model(tok, router_aux_loss_coef=0.25)
    assert model.aux_loss_coef == 0.25
    samples, _ = _encoded_pair(tok)
    sample = samples[0]
    images = images_to_vit_input(sample.media, VIT_CONFIG)
    with torch.no_grad():
        out = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None], torch.tensor([sample.labels]),
                    images.pixel_values, images.grid_hw)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss) and float(out.aux_loss) > 0
    assert torch.isfinite(out.lm_loss) and float(out.lm_loss) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.25 * out.aux_loss, atol=1e-6, rtol=1e-6)
    assert abs(float(out.loss - out.lm_loss)) > 1e-3  # the balancing loss does move the total


# ---------------------------------------------------------------------------------------------------
# set_trainable
# ---------------------------------------------------------------------------------------------------


def test_set_trainable_adapter_only_gives_only_adapter_grads(tok: Any) -> None:
    model = make_model(tok).train()
    counts = set_trainable(model, ["adapter"])
    adapter_size = sum(p.numel() for p in model.adapter.parameters())
    assert counts == {"vit": 0, "adapter": adapter_size, "llm": 0} and adapter_size > 0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapter.") for name in trainable)
    assert trainable == {f"adapter.{name}" for name, _ in model.adapter.named_parameters()}
    samples, _ = _encoded_pair(tok)
    sample = samples[1]
    images = images_to_vit_input(sample.media, VIT_CONFIG)
    out = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None], torch.tensor([sample.labels]),
                images.pixel_values, images.grid_hw)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("adapter."):
            assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
        else:
            assert parameter.grad is None, name
    counts = set_trainable(model, ["vit", "adapter", "llm"])
    assert all(p.requires_grad for p in model.parameters())
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_model(tok: Any) -> VisionLanguageModel:
    """A model with larger random weights, so greedy decoding does not repeat one token and the top
    two logits are far apart (no ties that rounding could flip between the cached and plain paths)."""
    model = make_model(tok, seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def manual_greedy(model: VisionLanguageModel, prompt: list[int], images: list[Image.Image], steps: int,
                  eos_id: int | None = None) -> tuple[list[int], float]:
    """Greedy tokens of one prompt alone, a full forward pass (no cache) per step; and the smallest
    gap between the top two logits met."""
    packed = images_to_vit_input(images, VIT_CONFIG)
    out: list[int] = []
    smallest_gap = float("inf")
    with torch.no_grad():
        prompt_embeds = model.embed(torch.tensor([prompt]), packed.pixel_values if packed else None,
                                    packed.grid_hw if packed else None)
        for _ in range(steps):
            new = model.llm.get_input_embeddings()(torch.tensor([out], dtype=torch.long))
            logits = model.llm(inputs_embeds=torch.cat([prompt_embeds, new], dim=1), use_cache=False).logits[0, -1]
            top = logits.topk(2)
            smallest_gap = min(smallest_gap, float(top.values[0] - top.values[1]))
            out.append(int(top.indices[0]))
            if out[-1] == eos_id:
                break
    return out, smallest_gap


def _generation_prompts(tok: Any) -> tuple[list[list[int]], list[list[Image.Image]]]:
    images = [[noise_image(56, 56, 8)], [noise_image(84, 56, 9), noise_image(56, 84, 10)]]
    questions = ["<image>\nWhat is this?", "<image> and <image>\nDescribe the two images in one sentence."]
    prompts = []
    for question, pictures in zip(questions, images):
        prompt, used = prompt_ids(tokenizer=tok, question=question,
                                  image_token_counts=[image_token_count(p, VIT_CONFIG) for p in pictures])
        assert len(used) == len(pictures)
        prompts.append(prompt)
    assert len(prompts[0]) < len(prompts[1])  # the first prompt is left-padded
    return prompts, images


def engine_greedy(model: VisionLanguageModel, tok: Any, prompts: list[list[int]], images: list[list[Image.Image]],
                  steps: int) -> list[list[int]]:
    """Greedy tokens from the generation engine (nothing banned, as in the manual loop)."""
    from components.generation.engine import GenerationEngine, GenerationInput, SamplingParams

    engine = GenerationEngine(model, tok)
    engine.banned = engine.banned[:0]
    items = []
    for prompt, pictures in zip(prompts, images):
        packed = images_to_vit_input(pictures, VIT_CONFIG)
        items.append(GenerationInput(prompt, packed.pixel_values, packed.grid_hw, SamplingParams(steps, temperature=0)))
    return [samples[0].token_ids for samples in engine.generate(items)]


def test_engine_matches_a_greedy_loop_without_cache(tok: Any, ids: SpecialIds,
                                                    sharp_model: VisionLanguageModel) -> None:
    prompts, images = _generation_prompts(tok)
    steps = 6
    expected = []
    for prompt, pictures in zip(prompts, images):
        tokens, gap = manual_greedy(sharp_model, prompt, pictures, steps)
        assert gap > 1e-3, "random weights gave a near tie; the comparison would be fragile"
        expected.append(tokens)
    assert not {ids.im_end, ids.pad} & set(expected[0] + expected[1])  # so nothing stops early here
    assert len(set(expected[0] + expected[1])) > 2  # not one repeated token
    assert engine_greedy(sharp_model, tok, prompts, images, steps) == expected  # batched, the first left-padded
    for prompt, pictures, tokens in zip(prompts, images, expected):  # one at a time: the same tokens
        assert engine_greedy(sharp_model, tok, [prompt], [pictures], steps) == [tokens]


# ---------------------------------------------------------------------------------------------------
# export and load
# ---------------------------------------------------------------------------------------------------


def test_export_then_load_gives_the_same_logits(tok: Any, ids: SpecialIds, tmp_path: Path) -> None:
    base = make_model(tok, seed=3)
    model = VisionLanguageModel(base.vit, base.llm, ids.image_pad, adapter_hidden=48,  # a narrower adapter
                                adapter_output_norm=True, adapter_position_buckets=8,
                                adapter_position_frequencies=3, adapter_position_scale=0.5).eval()
    with torch.no_grad():  # a non-default adapter, so loading it is visible
        for parameter in model.adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path / "export" / "stage1"
    (folder).mkdir(parents=True)
    (folder / "stale.txt").write_text("from an earlier export")  # replaced, not merged
    export_vlm(model, tok, folder, {"stage": "stage1", "step": 7})
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"vit.safetensors", "adapter.safetensors", "config.json", "llm/config.json"} <= names
    assert "llm/model.safetensors" in names or "llm/model.safetensors.index.json" in names
    assert "llm/tokenizer.json" in names and "llm/tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl", ".pth"))]
    assert "stale.txt" not in names and not (folder.parent / "stage1.tmp").exists()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architecture"] == EXPORT_ARCHITECTURE and saved["stage"] == "stage1" and saved["step"] == 7
    assert saved["image_pad_id"] == ids.image_pad

    loaded, loaded_tok, loaded_config = load_vlm(folder)
    assert not loaded.training and loaded_config == saved
    assert loaded.image_pad_id == ids.image_pad and SpecialIds.of(loaded_tok) == ids
    assert loaded.adapter.fc1.out_features == 48 and saved["adapter"]["hidden"] == 48
    assert saved["adapter"]["output_norm"] and loaded.adapter.out_norm is not None
    assert saved["adapter"]["position_buckets"] == 8 and loaded.adapter.position_buckets == 8
    assert saved["adapter"]["position_scale"] == loaded.adapter.position_scale == 0.5
    assert saved["adapter"]["position_frequencies"] == 3 and loaded.adapter.fc1.in_features == VIT_CONFIG.width + 12
    assert loaded.aux_loss_coef == model.aux_loss_coef > 0 and loaded.llm.config.output_router_logits
    assert loaded.vit.config == VIT_CONFIG
    samples, _ = _encoded_pair(tok)
    sample = samples[0]
    assert text_ids(loaded_tok, "a red circle on a white background") == \
        text_ids(tok, "a red circle on a white background")
    images = images_to_vit_input(sample.media, VIT_CONFIG)
    with torch.no_grad():
        logits = [m.llm(inputs_embeds=m.embed(torch.tensor([sample.input_ids]), images.pixel_values, images.grid_hw),
                        use_cache=False).logits for m in (model, loaded)]
        other = make_model(tok, seed=4)
        control = other.llm(inputs_embeds=other.embed(torch.tensor([sample.input_ids]), images.pixel_values,
                                                      images.grid_hw), use_cache=False).logits
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=1e-6)
    assert (control - logits[0]).abs().max() > 1e-3


def test_load_vlm_rejects_another_architecture(tok: Any, tmp_path: Path) -> None:
    folder = tmp_path / "vlm"
    export_vlm(make_model(tok), tok, folder, {})
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architecture": "llava"}))
    with pytest.raises(ValueError, match="architecture"):
        load_vlm(other)
    del config["architecture"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architecture"):
        load_vlm(other)


# ---------------------------------------------------------------------------------------------------
# build_llm
# ---------------------------------------------------------------------------------------------------


def test_build_llm_rejects_an_unknown_model_type(ids: SpecialIds) -> None:
    with pytest.raises(ValueError, match=r"train\.vlm\.llm\.model_type"):
        build_llm(llm_config(model_type="llama"), vocab_size=300, pad_id=ids.pad)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_build_llm_families_run_a_vlm_forward(tok: Any, ids: SpecialIds, model_type: str) -> None:
    torch.manual_seed(0)
    llm = build_llm(llm_config(model_type=model_type), vocab_size=len(tok), pad_id=ids.pad)
    assert llm.config.model_type == model_type
    assert llm.get_input_embeddings().weight.shape == (len(tok), 64)
    assert llm.config.num_hidden_layers == 2 and llm.config.output_router_logits
    model = VisionLanguageModel(SeedViT(VIT_CONFIG), llm, ids.image_pad).eval()
    samples, _ = _encoded_pair(tok)
    sample = samples[1]
    images = images_to_vit_input(sample.media, VIT_CONFIG)
    with torch.no_grad():
        out = model(torch.tensor([sample.input_ids]), torch.arange(sample.length)[None], torch.tensor([sample.labels]),
                    images.pixel_values, images.grid_hw)
    assert torch.isfinite(out.loss) and float(out.lm_loss) > 0 and float(out.aux_loss) > 0
    assert out.answer_tokens == sum(1 for label in sample.labels[1:] if label != IGNORE_INDEX)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_build_llm_experts_are_moe_intermediate_size_wide(ids: SpecialIds, model_type: str) -> None:
    """LlmConfig documents moe_intermediate_size as each expert's MLP width (intermediate_size is the
    width of dense, non-MoE layers), and build_llm maps "the names each family uses for the expert count,
    width and top-k"."""
    llm = build_llm(llm_config(model_type=model_type, num_layers=1, intermediate_size=128, moe_intermediate_size=48),
                    vocab_size=300, pad_id=ids.pad)
    expert_widths = {tuple(p.shape)[-1] for name, p in llm.named_parameters()
                     if "experts" in name and "down_proj" in name}
    assert expert_widths == {48}


def packed_logits(model: VisionLanguageModel, pack: Any, images: list[Image.Image]) -> torch.Tensor:
    batch = collate([pack])
    packed = images_to_vit_input(images, VIT_CONFIG)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], packed.pixel_values, packed.grid_hw)
        return model.llm(inputs_embeds=embeds, position_ids=batch["position_ids"], use_cache=False).logits[0]


@pytest.mark.parametrize("position_buckets,position_frequencies", [(0, 0), (8, 0), (0, 3)])
def test_changing_one_image_changes_its_own_samples_logits_and_no_others(tok: Any, ids: SpecialIds,
                                                                         position_buckets: int,
                                                                         position_frequencies: int) -> None:
    """The splice the perception issue rests on: inside one packed row, a new picture for sample b moves b's
    logits (after its image) and leaves sample a's untouched; a new picture for a moves only a's (with and
    without the adapter's token positions, which index each image's own grid)."""
    model = make_model(tok, seed=3, position_buckets=position_buckets, position_frequencies=position_frequencies)
    samples, (images_a, images_b) = _encoded_pair(tok)
    packer = Packer(max_tokens=256, max_images=8, pad_id=ids.pad, buffer_size=4)
    for sample in samples:
        packer.add(sample)
    [pack] = packer.flush()
    length_a = samples[0].length
    base = packed_logits(model, pack, images_a + images_b)
    new_b = packed_logits(model, pack, images_a + [noise_image(60, 100, 99)])
    new_a = packed_logits(model, pack, [noise_image(56, 56, 98), images_a[1]] + images_b)
    own_b, own_a = (new_b - base)[length_a:], (new_a - base)[:length_a]
    assert own_b.abs().max() > 1e-3 and own_a.abs().max() > 1e-3
    assert (new_b - base)[:length_a].abs().max() < 1e-5  # a never sees b's picture
    assert (new_a - base)[length_a:samples[0].length + samples[1].length].abs().max() < 1e-5


def test_adapter_output_norm_starts_at_the_text_embeddings_scale(tok: Any) -> None:
    torch.manual_seed(0)
    special = SpecialIds.of(tok)
    llm = build_llm(llm_config(), vocab_size=len(tok), pad_id=special.pad)
    plain = VisionLanguageModel(SeedViT(VIT_CONFIG), llm, special.image_pad)
    normed = VisionLanguageModel(SeedViT(VIT_CONFIG), llm, special.image_pad, adapter_output_norm=True)
    packed = images_to_vit_input([noise_image(56, 56, 1)], VIT_CONFIG)
    text_rms = float(llm.get_input_embeddings().weight.pow(2).mean().sqrt())
    with torch.no_grad():
        rms = [float(m.image_embeddings(packed.pixel_values, packed.grid_hw).pow(2).mean().sqrt()) for m in (plain, normed)]
    assert abs(rms[1] - text_rms) / text_rms < 0.05  # LayerNorm output at the embeddings' scale
    assert rms[0] > 3 * text_rms  # without it, image tokens start several times larger


def test_token_buckets_are_each_tokens_place_as_a_fraction_of_its_image() -> None:
    from components.vlm.model import token_buckets

    rows, cols = token_buckets(torch.tensor([[4, 6], [2, 2]]), merge_size=2, buckets=4)
    # image 1: 2 x 3 tokens, centres at 1/4, 3/4 of the height and 1/6, 3/6, 5/6 of the width; image 2: one token
    assert rows.tolist() == [1, 1, 1, 3, 3, 3, 2]
    assert cols.tolist() == [0, 2, 3, 0, 2, 3, 2]
    wide, tall = token_buckets(torch.tensor([[2, 64]]), 2, 4)[1], token_buckets(torch.tensor([[64, 2]]), 2, 4)[0]
    assert wide.tolist() == tall.tolist() == [i * 4 // 32 for i in range(32)]  # any length spans all buckets
    assert token_buckets(torch.zeros(0, 2, dtype=torch.long), 2, 4)[0].numel() == 0


def test_position_features_are_octaves_of_each_tokens_centre() -> None:
    from components.vlm.model import position_features, token_centres

    centres = token_centres(torch.tensor([[4, 6], [2, 2]]), merge_size=2)
    assert centres[:, 0].tolist() == [0.25] * 3 + [0.75] * 3 + [0.5]
    assert torch.allclose(centres[:3, 1], torch.tensor([1 / 6, 3 / 6, 5 / 6], dtype=torch.float64))
    features = position_features(centres, 2)
    assert features.shape == (7, 8) and features.abs().max() <= 1.0
    # layout: sin(y), sin(2y), cos(y), cos(2y), then the same of x (pi * 2^k * fraction)
    y, x = 0.25, 1 / 6
    expected = [torch.sin(torch.tensor(torch.pi * y)), torch.sin(torch.tensor(2 * torch.pi * y)),
                torch.cos(torch.tensor(torch.pi * y)), torch.cos(torch.tensor(2 * torch.pi * y)),
                torch.sin(torch.tensor(torch.pi * x)), torch.sin(torch.tensor(2 * torch.pi * x)),
                torch.cos(torch.tensor(torch.pi * x)), torch.cos(torch.tensor(2 * torch.pi * x))]
    assert torch.allclose(features[0], torch.stack(expected).float(), atol=1e-6)
    assert len({tuple(row) for row in features.round(decimals=5).tolist()}) == 7  # every token placed apart


@pytest.mark.parametrize("placement", [{"position_buckets": 4}, {"position_frequencies": 2}])
def test_adapter_positions_tell_identical_tokens_apart_and_need_the_grid(tok: Any, placement: dict[str, int]) -> None:
    from components.vlm.model import MlpAdapter

    torch.manual_seed(0)
    features = torch.randn(1, 32).repeat(6, 1)  # one 2 x 3-token image, every token the same
    grid = torch.tensor([[4, 6]])
    plain, placed = MlpAdapter(32, 16), MlpAdapter(32, 16, **placement)
    assert torch.allclose(plain(features), plain(features)[:1].expand(6, -1))
    out = placed(features, grid)
    assert len({tuple(row) for row in out.round(decimals=5).tolist()}) == 6
    with pytest.raises(ValueError, match="grid_hw"):
        placed(features)
    with pytest.raises(ValueError, match="tokens for grids"):
        placed(features, torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="position_buckets"):
        MlpAdapter(32, 16, position_buckets=-1)
    with pytest.raises(ValueError, match="position_frequencies"):
        MlpAdapter(32, 16, position_frequencies=-1)
    with pytest.raises(ValueError, match="position_scale"):
        MlpAdapter(32, 16, position_buckets=4, position_scale=0.0)


def test_position_scale_shrinks_the_added_embeddings_only() -> None:
    from components.vlm.model import MlpAdapter

    torch.manual_seed(0)
    full = MlpAdapter(32, 16, output_norm=True, position_buckets=4)
    quarter = MlpAdapter(32, 16, output_norm=True, position_buckets=4, position_scale=0.25)
    quarter.load_state_dict(full.state_dict())  # the same weights
    features, grid = torch.randn(6, 32), torch.tensor([[4, 6]])
    content = MlpAdapter(32, 16, output_norm=True)
    content.load_state_dict({k: v for k, v in full.state_dict().items() if "embedding" not in k})
    base = content(features)
    assert torch.allclose(quarter(features, grid) - base, 0.25 * (full(features, grid) - base), atol=1e-6)
