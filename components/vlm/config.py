"""Config schema of the VLM steps (`train.vlm`): the LLM (a pretrained Hugging Face MoE folder, or one built
from the fields here), the adapter, the text-only LLM pretraining that stands in for a pretrained LLM,
stages 0, 1 and 2 (what trains and on which mix is config, not code), and the evaluation suite."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from components.common.resources import Resources
from components.rl.config import RewardModelConfig, RewardModelJob, RlConfig, RlJob
from components.training.config import DeepSpeedSettings

PARTS = ("vit", "adapter", "llm")  # what a stage can train
MIX_TASKS = ("caption", "ocr", "grounding", "counting", "video")  # the shard folders a stage can draw from
STAGES = ("stage0", "stage1", "stage2")
SFT_STAGES = ("sft", "sft_rs")  # SFT on the templated conversations, then again with the rejection-sampled answers
VERIFIABLE_TASKS = ("counting", "grounding", "ocr", "video")  # tasks whose answers a verifier scores


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
    steps: int = 2000
    learning_rate: float = 0.0003
    warmup_steps: int = 100
    max_tokens: int = 4096  # per packed sequence
    packs_per_step: int = 4  # per worker

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_tokens < 16 or self.packs_per_step < 1:
            raise ValueError("steps and packs_per_step must be >= 1 and max_tokens >= 16")


# How the answer tokens of a packed batch are averaged (InternVL 2.5's `loss_reduction`): each token weighs
# 1 / n ** p, n the answer tokens of its sample. "token" (p = 0): every token alike, so a sample with long
# answers (a caption, four boxes) outweighs one with short ones (four one-digit counts); "sample" (p = 1): every
# sample alike; "square" (p = 0.5) in between.
LOSS_REDUCTIONS = {"token": 0.0, "square": 0.5, "sample": 1.0}


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
    max_pixels: int = 0  # images resized to hold at most this many pixels from this stage on; 0: the ViT's own
    # how answer tokens are averaged: "token" (all alike), "sample" (every sample alike, so four one-digit counts
    # weigh as much as a caption), "square" (1/sqrt(tokens of the sample)); InternVL 2.5's loss_reduction
    loss_reduction: str = "token"

    def __post_init__(self) -> None:
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {sorted(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        if self.max_pixels and self.max_pixels < 28 * 28:
            raise ValueError(f"max_pixels must be 0 (the ViT's own) or at least 784 (one 28x28 token), "
                             f"got {self.max_pixels}")
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
    max_items_per_kind: int = 200
    max_new_tokens: int = 64  # at least; a batch decodes as far as its longest reference answer (+4) needs
    batch_size: int = 16  # items per greedy-decoding batch (a Ray Data batch)
    num_gpus: float = 0.0  # per evaluation actor/task; with a GPU the model runs there in bf16
    gap_batches: int = 8  # batches of held-out answers for the image-use gap (true vs shuffled images)
    probe_images: int = 600  # pictures for the linear probes on the export's ViT and adapter tokens; 0: none
    thinking_max_new_tokens: int = 512  # the SFT export's thinking-mode answers: reasoning, then the answer
    post_training_probes: bool = True  # the probes on the SFT and RL exports too (stages 0-2 always have them)
    resources: Resources = dataclasses.field(default_factory=Resources)


@dataclasses.dataclass
class SftDataConfig:
    """`sft_data`: the training split's samples as instruction conversations in two answer modes."""

    enabled: bool = True
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(MIX_TASKS))
    thinking_share: float = 0.5  # of the samples, written in thinking mode (templated reasoning); the rest direct
    max_samples_per_task: int = 0  # 0: every training-split sample
    samples_per_shard: int = 256

    def __post_init__(self) -> None:
        bad = sorted(set(self.tasks) - set(MIX_TASKS))
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of {list(MIX_TASKS)}, got {self.tasks}")
        if not 0.0 <= self.thinking_share <= 1.0:
            raise ValueError(f"thinking_share must be in [0, 1], got {self.thinking_share}")
        if self.max_samples_per_task < 0 or self.samples_per_shard < 1:
            raise ValueError("max_samples_per_task must be >= 0 and samples_per_shard >= 1")


@dataclasses.dataclass
class RejectionSamplingConfig:
    """`rejection_sampling`: the first SFT export answers training-split prompts k times with thinking on; the
    verifiers keep the correct answers (the shortest of the ties, de-duplicated) for the second SFT round."""

    enabled: bool = True
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(VERIFIABLE_TASKS))
    prompts_per_task: int = 256
    samples_per_prompt: int = 8  # k
    keep_per_prompt: int = 1  # accepted answers kept per prompt, shortest first
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts per Ray Data batch
    num_gpus: float = 0.0  # per sampling actor
    samples_per_shard: int = 256
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        bad = sorted(set(self.tasks) - set(VERIFIABLE_TASKS))
        if bad:
            raise ValueError(f"rejection_sampling.tasks: {bad} have no verifier; use some of {list(VERIFIABLE_TASKS)}")
        if min(self.prompts_per_task, self.samples_per_prompt, self.keep_per_prompt, self.max_new_tokens,
               self.batch_size, self.samples_per_shard) < 1:
            raise ValueError("prompts_per_task, samples_per_prompt, keep_per_prompt, max_new_tokens, batch_size and "
                             "samples_per_shard must be >= 1")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rejection sampling needs temperature > 0 and top_p in (0, 1], got {self.temperature} "
                             f"and {self.top_p}")


@dataclasses.dataclass
class TokenBalanceConfig:
    """Visual-token redistribution in the data-parallel training step (`components/vlm/token_balance.py`):
    each step's images are pooled within groups of `group_size` workers and run through the ViT where
    the greedy plan puts them, so no worker waits on one that drew a few huge images."""

    enabled: bool = True
    group_size: int = 192  # workers per group (the paper's); images never leave their group

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"token_balance.group_size must be >= 1, got {self.group_size}")


@dataclasses.dataclass
class VlmConfig:
    """`train.vlm`: everything the VLM steps read."""

    llm: LlmConfig = dataclasses.field(default_factory=LlmConfig)
    adapter_hidden: int = 0  # the adapter MLP's hidden width; 0: the LLM's hidden size
    adapter_output_norm: bool = False  # a LayerNorm at the adapter's output, at the text embeddings' scale
    # > 0: learned row and column embeddings (this many buckets of the image's height and width) added to each
    # visual token, so the LLM knows where in the image a token sits; 0: none (tokens carry no position)
    adapter_position_buckets: int = 0
    # > 0: the token's place in its image enters the adapter MLP beside its features, as sin/cos of this many
    # octaves of its centre's height and width fractions; 0: none
    adapter_position_frequencies: int = 0
    # the added row/column embeddings times this (init and learned alike): < 1 keeps them below the content
    adapter_position_scale: float = 1.0
    holdout_fraction: float = 0.05  # samples kept out of every stage, for the evaluation
    system_prompt: str = ""  # prepended to every training sample when set
    llm_pretrain: LlmPretrainConfig = dataclasses.field(default_factory=LlmPretrainConfig)
    stage0: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        trainable=["adapter"], steps=1000, learning_rate=0.001, warmup_steps=50, max_tokens=8192))
    stage1: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        steps=10000, warmup_steps=500, max_tokens=8192))
    stage2: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        steps=2000, learning_rate=5e-05, warmup_steps=100, max_tokens=32768, max_images=128, frames_per_clip=16,
        mix={"caption": 1.0, "ocr": 1.0, "grounding": 1.0, "counting": 1.0, "video": 1.0}))
    sft_data: SftDataConfig = dataclasses.field(default_factory=SftDataConfig)
    sft: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        steps=2000, learning_rate=2e-05, warmup_steps=100, max_tokens=32768, max_images=128, frames_per_clip=16,
        mix={"caption": 1.0, "ocr": 1.0, "grounding": 1.0, "counting": 1.0, "video": 1.0}))
    rejection_sampling: RejectionSamplingConfig = dataclasses.field(default_factory=RejectionSamplingConfig)
    sft_rs: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        steps=500, learning_rate=1e-05, warmup_steps=25, max_tokens=32768, max_images=128, frames_per_clip=16,
        mix={"caption": 1.0, "ocr": 1.0, "grounding": 1.0, "counting": 1.0, "video": 1.0}))
    eval: VlmEvalConfig = dataclasses.field(default_factory=VlmEvalConfig)
    reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    rl: RlConfig = dataclasses.field(default_factory=RlConfig)
    num_workers: int = 8
    use_gpu: bool = True
    checkpoint_every: int = 500
    max_failures: int = 3
    weight_decay: float = 0.0
    deepspeed: DeepSpeedSettings = dataclasses.field(default_factory=lambda: DeepSpeedSettings(bf16=True))
    token_balance: TokenBalanceConfig = dataclasses.field(default_factory=TokenBalanceConfig)
    fail_at_step: int = -1  # testing only: the last worker exits once at this step of every stage (-1: never)
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.adapter_position_buckets < 0:
            raise ValueError(f"adapter_position_buckets must be >= 0 (0: no position embeddings), got "
                             f"{self.adapter_position_buckets}")
        if not self.adapter_position_scale > 0:
            raise ValueError(f"adapter_position_scale must be > 0, got {self.adapter_position_scale}")
        if self.adapter_position_frequencies < 0:
            raise ValueError(f"adapter_position_frequencies must be >= 0 (0: no position inputs), got "
                             f"{self.adapter_position_frequencies}")

    @property
    def job(self) -> TrainJob:
        return TrainJob(num_workers=self.num_workers, use_gpu=self.use_gpu, checkpoint_every=self.checkpoint_every,
                        max_failures=self.max_failures, weight_decay=self.weight_decay, deepspeed=self.deepspeed,
                        token_balance=self.token_balance, fail_at_step=self.fail_at_step, resources=self.resources)


@dataclasses.dataclass
class TrainJob:
    """How a VLM training job runs (shared by every stage; read by the training runtime)."""

    num_workers: int
    use_gpu: bool
    checkpoint_every: int
    max_failures: int
    weight_decay: float
    deepspeed: DeepSpeedSettings
    token_balance: TokenBalanceConfig
    fail_at_step: int
    resources: Resources


@dataclasses.dataclass
class LlmPretrainJob:
    """What `llm_pretrain` uses of `train.vlm`, and so all its cache key holds."""

    stage: LlmPretrainConfig
    llm: LlmConfig
    holdout_fraction: float
    job: TrainJob
    name: str = "llm_pretrain"


@dataclasses.dataclass
class VlmStageJob:
    """What one VLM stage (`vlm_stage0` .. `vlm_stage2`) uses of `train.vlm`: its own stage settings, the
    model it builds, the split and the job; never another stage's settings or the evaluation's."""

    name: str
    stage: StageConfig
    llm: LlmConfig
    adapter_hidden: int
    holdout_fraction: float
    system_prompt: str
    job: TrainJob
    adapter_output_norm: bool = False
    adapter_position_buckets: int = 0
    adapter_position_frequencies: int = 0
    adapter_position_scale: float = 1.0


@dataclasses.dataclass
class VlmEvalJob:
    """What the evaluation of one stage's export uses: the suite's settings, the split, the prompt, and
    the stage's own frame count and sequence length (so answers see what training saw)."""

    stage_name: str
    eval: VlmEvalConfig
    holdout_fraction: float
    system_prompt: str
    frames_per_clip: int
    max_tokens: int
    # The answer modes an SFT or RL export is asked in (a stage's export: none, its own prompt), and whether
    # the linear probes run (stages 0-2 always; SFT and RL per `eval.post_training_probes`).
    modes: tuple[str, ...] = ()
    probes: bool = True


@dataclasses.dataclass
class SftDataJob:
    """What `sft_data` uses of `train.vlm`: its settings and the split (held-out samples never enter SFT)."""

    data: SftDataConfig
    holdout_fraction: float


@dataclasses.dataclass
class RejectionSamplingJob:
    """What `rejection_sampling` uses: its settings, the split, and the first SFT round's frame count and
    sequence length (the prompts are built as that round trained)."""

    sampling: RejectionSamplingConfig
    holdout_fraction: float
    frames_per_clip: int
    max_tokens: int


def sft_data_view(vlm: VlmConfig) -> SftDataJob:
    return SftDataJob(vlm.sft_data, vlm.holdout_fraction)


def rejection_sampling_view(vlm: VlmConfig) -> RejectionSamplingJob:
    return RejectionSamplingJob(vlm.rejection_sampling, vlm.holdout_fraction, vlm.sft.frames_per_clip,
                                vlm.sft.max_tokens)


def llm_pretrain_view(vlm: VlmConfig) -> LlmPretrainJob:
    return LlmPretrainJob(vlm.llm_pretrain, vlm.llm, vlm.holdout_fraction, vlm.job)


def stage_view(name: str) -> Callable[[VlmConfig], VlmStageJob]:
    def view(vlm: VlmConfig) -> VlmStageJob:
        return VlmStageJob(name, getattr(vlm, name), vlm.llm, vlm.adapter_hidden, vlm.holdout_fraction,
                           vlm.system_prompt, vlm.job, vlm.adapter_output_norm, vlm.adapter_position_buckets,
                           vlm.adapter_position_frequencies, vlm.adapter_position_scale)
    return view


def eval_view(name: str) -> Callable[[VlmConfig], VlmEvalJob]:
    def view(vlm: VlmConfig) -> VlmEvalJob:
        stage = getattr(vlm, name)
        job = VlmEvalJob(name, vlm.eval, vlm.holdout_fraction, vlm.system_prompt, stage.frames_per_clip,
                         stage.max_tokens)
        if name in SFT_STAGES:
            return dataclasses.replace(job, modes=("direct", "thinking"), probes=vlm.eval.post_training_probes)
        return job
    return view


def reward_model_view(vlm: VlmConfig) -> RewardModelJob:
    return RewardModelJob(vlm.reward_model, vlm.holdout_fraction, vlm.sft.frames_per_clip)


def rl_view(vlm: VlmConfig) -> RlJob:
    return RlJob(vlm.rl, vlm.holdout_fraction, vlm.sft.frames_per_clip, vlm.reward_model.max_tokens)


def rl_eval_view(vlm: VlmConfig) -> VlmEvalJob:
    """The RL export is evaluated as the SFT export is (its frame count and sequence length), under its own name,
    in the modes RL trained: both when it rolled out in thinking mode (the hybrid policy must still answer
    directly), direct only when it rolled out in direct mode (it never saw a thinking prompt, so its
    thinking-mode scores would measure the SFT model's thinking, drifted, not anything RL did)."""
    modes = ("direct", "thinking") if vlm.rl.answer_mode == "thinking" else ("direct",)
    return dataclasses.replace(eval_view("sft")(vlm), stage_name="rl", modes=modes)
