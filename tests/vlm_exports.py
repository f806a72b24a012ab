"""A tiny exported VLM with random weights, for tests of code that loads an export (serving, captioning): the
real tokenizer training, model classes and `export_vlm`, at sizes that build in about a second; and a tiny
transformers image-text-to-text folder (`make_tiny_llava`) for the captioning steps' transformers path."""

from __future__ import annotations

from pathlib import Path

import torch

from components.common.torchvision_compat import ensure_torchvision_importable
from components.vit.config import SeedViTConfig
from components.vlm.config import LlmConfig

VIT = SeedViTConfig(width=32, depth=2, num_heads=2, min_pixels=3136, max_pixels=12544)
LLM = LlmConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                moe_intermediate_size=64, num_experts=4, experts_per_token=2, vocab_size=400,
                max_position_embeddings=4096)


def corpus() -> list[str]:
    colors, shapes = ("red", "blue", "green", "purple"), ("circle", "square", "triangle")
    texts = [f"a {c} {s} on a white background" for c in colors for s in shapes]
    texts += [f"How many {c} {s}s are there? {n}" for c in colors for s in shapes for n in range(4)]
    texts += ["Describe the image.", "What is shown in this picture?", "<box>[733, 79, 793, 156]</box>",
              "café naïve 中文 ✓", "[12.0 second]", "<think>step by step</think> so the answer is 3"]
    return texts * 3


def write_random_export(folder: Path, seed: int = 0, weight_scale: float = 0.3) -> Path:
    """An export at `folder` whose LLM has large random weights (so greedy decoding wanders through the
    vocabulary instead of repeating one token)."""
    ensure_torchvision_importable()
    from components.vit.model import SeedViT
    from components.vlm.model import VisionLanguageModel, build_llm, export_vlm
    from components.vlm.tokenizer import SpecialIds, train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus(), vocab_size=LLM.vocab_size)
    special = SpecialIds.of(tokenizer)
    model = VisionLanguageModel(SeedViT(VIT), build_llm(LLM, vocab_size=len(tokenizer), pad_id=special.pad),
                                special.image_pad)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * weight_scale)
    export_vlm(model.eval(), tokenizer, folder, {"stage": "random", "steps": 0})
    return folder


THINK_QUESTION = "How many circles are there?"
THINK_REASONING = "I see three red circles."
THINK_ANSWER = "3"


def write_two_mode_export(folder: Path, seed: int = 0, max_steps: int = 300) -> Path:
    """An export trained (on one question, a few hundred Adam steps, a few seconds) to answer
    `THINK_QUESTION` with `<think>THINK_REASONING</think>THINK_ANSWER` under the thinking system prompt and
    with `THINK_ANSWER` alone under the direct one, and exported as an SFT step exports (with its answer
    modes): a served model whose thinking is trained behaviour, for the serving tests."""
    ensure_torchvision_importable()
    from components.vit.model import SeedViT
    from components.vlm.conversation import encode_sample
    from components.vlm.model import VisionLanguageModel, build_llm, causal_lm_loss, export_vlm
    from components.vlm.modes import MODES, system_prompt
    from components.vlm.tokenizer import SpecialIds, train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus() + [THINK_REASONING] * 3, vocab_size=LLM.vocab_size)
    special = SpecialIds.of(tokenizer)
    model = VisionLanguageModel(SeedViT(VIT), build_llm(LLM, vocab_size=len(tokenizer), pad_id=special.pad),
                                special.image_pad)
    answers = {"thinking": f"<think>{THINK_REASONING}</think>{THINK_ANSWER}", "direct": THINK_ANSWER}
    samples = [encode_sample(key=mode, task="counting", turns=[(THINK_QUESTION, answer)], tokenizer=tokenizer,
                             image_token_counts=[], max_tokens=512, system=system_prompt(mode))
               for mode, answer in answers.items()]
    optimizer = torch.optim.Adam(model.llm.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        loss = sum(causal_lm_loss(model.llm, model.embed(torch.tensor([s.input_ids]), None, None),
                                  torch.arange(len(s.input_ids))[None], torch.tensor([s.labels]), 0.0).lm_loss
                   for s in samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if float(loss.detach()) < 0.02:  # both answers the greedy ones by far
            break
    export_vlm(model.eval(), tokenizer, folder, {"stage": "sft", "steps": max_steps, "answer_modes": dict(MODES)})
    return folder


TINY_LLAVA_WORDS = ["pancake", "pan", "flips", "someone", "butter", "kitchen", "hand", "plate", "stove", "golden",
                    "batter", "spatula"]


def make_tiny_llava(folder: Path) -> Path:
    """A randomly initialised LLaVA (1-layer CLIP tower, 1-layer Llama) with a word-level tokenizer, saved
    with its processor: loads through AutoProcessor + AutoModelForImageTextToText. Special tokens' output
    rows are zeroed and the words' scaled up, so greedy decoding writes words rather than ending at once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from components.common.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
    vocab = {word: index for index, word in enumerate(specials + TINY_LLAVA_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %} <image> "
                "{% else %} {{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                  crop_size={"height": 28, "width": 28}),
                               tokenizer=fast, patch_size=14, vision_feature_select_strategy="default",
                               chat_template=template, num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=16),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=1024,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        image_token_index=3, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[:len(specials)] = 0.0
        head[len(specials):] *= 50.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
