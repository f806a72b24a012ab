"""Config schema of the VLM steps (`train.vlm`): the LLM (a pretrained Hugging Face MoE folder, or one built
from the fields here), the adapter, the text-only LLM pretraining that stands in for a pretrained LLM,
stages 0, 1 and 2 (what trains and on which mix is config, not code), and the evaluation suite."""

from __future__ import annotations

import dataclasses

from components.common.resources import Resources
from components.vit.config import DeepSpeedSettings

PARTS = ("vit", "adapter", "llm")  # what a stage can train
MIX_TASKS = ("caption", "ocr", "grounding", "counting", "video")  # the shard folders a stage can draw from
STAGES = ("stage0", "stage1", "stage2")


@dataclasses.dataclass
class LlmConfig:
    """The decoder-only mixture-of-experts LLM: a pretrained Hugging Face folder (full profile), or a
    model of `model_type` built from these sizes (tiny profile, trained by `llm_pretrain` first)."""

    pretrained_path: str = ""  # a Hugging Face causal-LM folder with its tokenizer; empty: build from the fields below
    model_type: str = "qwen3_moe"  # any transformers MoE causal LM type: qwen3_moe, qwen2_moe, mixtral, olmoe, ...
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 6144  # dense MLP width, for layers that are not MoE
    moe_intermediate_size: int = 768  # each expert's MLP width
    num_experts: int = 64
    experts_per_token: int = 8  # top-k routing
    router_aux_loss_coef: float = 0.001  # the load-balancing loss weight
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    vocab_size: int = 32000  # the byte-level BPE trained on the corpus when there is no pretrained tokenizer
    tokenizer_min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be at least 300 (256 bytes + special tokens)")


@dataclasses.dataclass
class LlmPretrainConfig:
    """Text-only pretraining of the built LLM on the corpus's text (captions, questions, answers)."""

    enabled: bool = True
    steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_tokens: int = 512  # per packed sequence
    packs_per_step: int = 8  # per worker

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_tokens < 16 or self.packs_per_step < 1:
            raise ValueError("steps and packs_per_step must be >= 1 and max_tokens >= 16")


@dataclasses.dataclass
class StageConfig:
    """One VLM training stage: which parts train, on what mix, with what sequence length."""

    enabled: bool = True
    steps: int = 100
    learning_rate: float = 1e-4
    vit_lr_scale: float = 0.1  # the ViT's learning rate relative to the rest (a pretrained tower moves slowly)
    warmup_steps: int = 10
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["vit", "adapter", "llm"])
    max_tokens: int = 4096  # per packed sequence
    max_images: int = 32  # per packed sequence (a video's frames count one each)
    packs_per_step: int = 1  # per worker
    pack_buffer: int = 16  # samples the best-fit packer chooses from
    mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"caption": 1.0, "ocr": 1.0, "grounding": 1.0, "counting": 1.0})
    frames_per_clip: int = 8  # video frames drawn evenly from each clip's sampled frames

    def __post_init__(self) -> None:
        unknown = sorted(set(self.trainable) - set(PARTS))
        if unknown or not self.trainable:
            raise ValueError(f"trainable must be a non-empty list of {list(PARTS)}, got {self.trainable}")
        bad = sorted(set(self.mix) - set(MIX_TASKS))
        if bad:
            raise ValueError(f"mix has unknown task(s) {bad}; the tasks are {list(MIX_TASKS)}")
        if not any(w > 0 for w in self.mix.values()) or any(w < 0 for w in self.mix.values()):
            raise ValueError(f"mix weights must be >= 0 with at least one > 0, got {self.mix}")
        if self.steps < 1 or self.max_tokens < 16 or self.max_images < 1 or self.packs_per_step < 1:
            raise ValueError("steps, max_images and packs_per_step must be >= 1 and max_tokens >= 16")


@dataclasses.dataclass
class VlmEvalConfig:
    """The evaluation suite run after every stage on held-out samples."""

    enabled: bool = True
    max_items_per_kind: int = 64
    max_new_tokens: int = 48  # at least; a batch decodes as far as its longest reference answer (+4) needs
    batch_size: int = 8  # items per greedy-decoding batch (a Ray Data batch)
    num_gpus: float = 0.0  # per evaluation actor/task; with a GPU the model runs there in bf16
    gap_batches: int = 4  # batches of held-out answers for the image-use gap (true vs shuffled images)
    resources: Resources = dataclasses.field(default_factory=Resources)


@dataclasses.dataclass
class VlmConfig:
    """`train.vlm`: everything the VLM steps read."""

    llm: LlmConfig = dataclasses.field(default_factory=LlmConfig)
    adapter_hidden: int = 0  # the adapter MLP's hidden width; 0: the LLM's hidden size
    holdout_fraction: float = 0.05  # samples kept out of every stage, for the evaluation
    system_prompt: str = ""  # prepended to every training sample when set
    llm_pretrain: LlmPretrainConfig = dataclasses.field(default_factory=LlmPretrainConfig)
    stage0: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(trainable=["adapter"]))
    stage1: StageConfig = dataclasses.field(default_factory=StageConfig)
    stage2: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        max_tokens=16384, mix={"caption": 1.0, "ocr": 1.0, "grounding": 1.0, "counting": 1.0, "video": 1.0}))
    eval: VlmEvalConfig = dataclasses.field(default_factory=VlmEvalConfig)
    num_workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 50
    max_failures: int = 2
    weight_decay: float = 0.0
    deepspeed: DeepSpeedSettings = dataclasses.field(default_factory=DeepSpeedSettings)
    fail_at_step: int = -1  # testing only: the last worker exits once at this step of every stage (-1: never)
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    def stage(self, name: str) -> StageConfig | LlmPretrainConfig:
        return self.llm_pretrain if name == "llm_pretrain" else getattr(self, name)
