"""The captioning model the data steps run (`image_captions`, `video_captions`): naming it in config (a
registry URI or a local folder, checked before anything runs, fingerprinted for the cache key, resolved to
a folder), loading it once per Ray Data actor (our exported VLM through the generation engine, or a local
transformers image-text-to-text model through `generate`), asking it one question about a few images, and
cleaning its answer into one caption sentence.

A request is `(images, stamps)`: encoded images, and the time of each when they are a video's frames
(`[t second]` before each frame, asked as a `<video>`), or no stamps for still images (asked as `<image>`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

from components.common.model_registry import model_identity, resolve_model

Request = tuple[list[bytes], list[float]]  # encoded images (PNG/JPEG/WebP), each frame's time (none: stills)


class CaptionSettings(Protocol):
    """What a captioner reads of its step's config section (ImageCaptionsConfig, VideoCaptionsConfig)."""

    prompt: str
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float


# ---- naming the model in config ------------------------------------------------------------------------

def is_exported_vlm(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "vit.safetensors").is_file() and (folder / "llm").is_dir()


def check_model_folder(folder: Path) -> str:
    """'vlm' (our export) or 'transformers'; else an error naming what a model folder holds."""
    if is_exported_vlm(folder):
        return "vlm"
    if (folder / "config.json").is_file():
        return "transformers"
    raise FileNotFoundError(
        f"{folder} is not a model folder: an exported VLM holds config.json, "
        "vit.safetensors, adapter.safetensors and llm/; a transformers image-text-to-text model holds config.json, "
        "its weights and its processor files (save_pretrained of the model and of its AutoProcessor)")


def captioner_identity(model: str, registry_uri: str) -> dict[str, Any]:
    """The captioner as cache-key material: a registry URI by the version it resolves to now (so moving an
    alias recomputes the step), a folder by its files. The registry's address is left out of the key."""
    return {"captioner": model_identity(model, registry_uri)}


def captioner_error(key: str, model: str, registry_uri: str) -> str:
    """Before anything runs: '' when the captioner exists (a registry version, or a model folder), else the
    config key (`key`, e.g. data.image_captions.model) and what is wrong."""
    try:
        if model.startswith("models:"):
            model_identity(model, registry_uri)
        else:
            check_model_folder(Path(model).expanduser())
    except (FileNotFoundError, ValueError) as error:
        return f"{key}: {error}"
    return ""


def captioner_folder(model: str, registry_uri: str, download_dir: Path) -> tuple[Path, str]:
    """The model's local folder (a registry version downloaded into `download_dir`) and its label, the
    `<resolved model>` of `caption_source: model:<resolved model>` (models:/seedvl/3, or the folder's path)."""
    if model.startswith("models:"):
        resolved = resolve_model(model, registry_uri, download_dir)
        return resolved.folder, resolved.label
    folder = Path(model).expanduser().resolve()
    return folder, str(folder)


# ---- the model, once per actor --------------------------------------------------------------------------

class VlmCaptioner:
    """Our exported VLM in the generation engine (greedy, or sampled with a seed per request); an export
    trained with answer modes is asked in direct mode."""

    def __init__(self, folder: Path, cfg: CaptionSettings) -> None:
        from components.generation.engine import GenerationEngine
        from components.vlm.inference import load_for_inference
        from components.vlm.modes import system_prompt

        model, self.tokenizer = load_for_inference(folder)
        self.engine = GenerationEngine(model, self.tokenizer)
        saved = json.loads((folder / "config.json").read_text())
        self.system = system_prompt("direct") if saved.get("answer_modes") else None
        self.cfg = cfg

    def caption(self, requests: list[Request], seeds: list[int]) -> list[str]:
        from components.generation.engine import SamplingParams
        from components.vlm.conversation import answer_text
        from components.vlm.inference import generation_request
        from components.vlm.tokenizer import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

        cfg = self.cfg
        inputs = []
        for (images, stamps), seed in zip(requests, seeds):
            media = VIDEO_PLACEHOLDER if stamps else IMAGE_PLACEHOLDER * len(images)
            inputs.append(generation_request(self.engine, self.tokenizer, f"{media}\n{cfg.prompt}", images, stamps,
                                             self.system, SamplingParams(max_tokens=cfg.max_new_tokens,
                                                                         temperature=cfg.temperature, top_p=cfg.top_p,
                                                                         seed=seed)))
        return [answer_text(self.tokenizer, samples[0].token_ids) for samples in self.engine.generate(inputs)]


class TransformersCaptioner:
    """A local transformers image-text-to-text model (AutoProcessor + AutoModelForImageTextToText, files only,
    never downloaded) through `generate`; a video's frames are images after their `[t second]` text. Sampling
    is seeded per generation call (by its first request's seed)."""

    def __init__(self, folder: Path, cfg: CaptionSettings) -> None:
        import torch

        from components.common.torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # transformers' image processors import torchvision
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation continues every row at its end
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True,
                                                                 dtype=dtype).to(device).eval()
        self.cfg = cfg

    def caption(self, requests: list[Request], seeds: list[int]) -> list[str]:
        import torch

        from components.common.video import timestamp_prefix
        from components.vlm.data import decode_png

        texts, images = [], []
        for pictures, stamps in requests:
            content: list[dict[str, str]] = []
            if stamps:
                for stamp in stamps:
                    content += [{"type": "text", "text": timestamp_prefix(stamp)}, {"type": "image"}]
            else:
                content += [{"type": "image"} for _ in pictures]
            content.append({"type": "text", "text": self.cfg.prompt})
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True))
            images.append([decode_png(bytes(p)) for p in pictures])
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.model.device)
        sampled = self.cfg.temperature > 0
        options = {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p} if sampled else {
            "do_sample": False}
        if sampled:
            torch.manual_seed(seeds[0])
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, **options)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def load_captioner(folder: Path, cfg: CaptionSettings) -> VlmCaptioner | TransformersCaptioner:
    kind = check_model_folder(folder)
    return VlmCaptioner(folder, cfg) if kind == "vlm" else TransformersCaptioner(folder, cfg)


class CaptionerActor:
    """Base of the captioning steps' Ray Data callable classes: the captioner loaded once per actor, on
    `threads` CPU threads, with the step's config section and the run's seed."""

    def __init__(self, folder: str, cfg: Any, seed: int = 0, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg, self.seed = cfg, seed
        self.captioner = load_captioner(Path(folder), cfg)


def caption_in_batches(captioner: VlmCaptioner | TransformersCaptioner, requests: list[Request], seeds: list[int],
                       size: int) -> list[str]:
    """Every request's raw answer, `size` requests per generation call."""
    answers: list[str] = []
    for first in range(0, len(requests), size):
        answers += captioner.caption(requests[first:first + size], seeds[first:first + size])
    return answers


# ---- the answer ---------------------------------------------------------------------------------------

def clean_answer(text: str, min_words: int) -> str | None:
    """The model's answer as one caption sentence, or None when it is unusable (empty, or fewer than
    `min_words` words of letters): reasoning before `</think>`, media/markup tokens, control characters and
    undecodable bytes removed, whitespace collapsed."""
    answer = text.split("</think>", 1)[1] if "</think>" in text else text
    answer = re.sub(r"<[^<>\s]{1,40}>", " ", answer)
    answer = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in answer)
    answer = " ".join(answer.split())
    if len(re.findall(r"[^\W\d_]{2,}", answer)) < min_words:
        return None
    return answer
