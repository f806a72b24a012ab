"""Config schema of the post-SFT steps (`train.vlm.reward_model`, `train.vlm.rl`) and the typed views each
step's cache key holds: the reward model's Bradley-Terry training, and hybrid RL's driver, its worker groups'
resources and the algorithm's constants (`RlAlgoConfig`, VAPO's defaults)."""

from __future__ import annotations

import dataclasses

from components.common.resources import Resources
from components.rl.algorithms import PROMPT_TYPES, RlAlgoConfig
from components.training.config import DeepSpeedSettings

RL_VERIFIABLE_KINDS = ("counting", "grounding", "ocr", "video_grounding")  # prompt kinds a verifier scores
RL_GENERAL_KINDS = ("caption",)  # prompt kinds the reward model scores
ANSWER_MODES = ("thinking", "direct")
WORKER_GROUPS = ("rollout", "reference", "reward", "critic", "actor")


@dataclasses.dataclass
class RewardModelConfig:
    """`reward_model`: a scalar value head on the SFT export, trained with Bradley-Terry on preference pairs
    from our own tasks (see `components/rl/reward_model.py`)."""

    enabled: bool = True
    steps: int = 300
    learning_rate: float = 1e-5  # the backbone's (the parts in `trainable`)
    head_learning_rate: float = 1e-3  # the value head's, a fresh layer
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["adapter", "llm"])
    pairs_per_step: int = 8
    max_pairs_per_prompt: int = 4  # (chosen, rejected) pairs drawn from one prompt
    caption_prompts: int = 256  # training-split caption samples turned into concise-vs-rambling pairs
    rambling_sentences: int = 2  # other captions' sentences appended to the reference to make it ramble
    colour_swaps: int = 1  # per caption, pairs of the reference over itself with one object's colour changed
    omissions: int = 1  # per caption, pairs of the reference over itself with one object left out
    heldout_fraction: float = 0.2  # of the prompts: their pairs never train, they give the held-out accuracy
    max_tokens: int = 1024  # per scored sequence (prompt + answer); longer answers are cut
    num_gpus: float = 0.0
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        bad = sorted(set(self.trainable) - {"vit", "adapter", "llm"})
        if bad:
            raise ValueError(f"train.vlm.reward_model.trainable has unknown part(s) {bad}; use some of "
                             "[vit, adapter, llm] (the value head always trains), or [] for the head alone")
        if min(self.steps, self.pairs_per_step, self.max_pairs_per_prompt, self.max_tokens) < 1:
            raise ValueError("train.vlm.reward_model.steps, pairs_per_step, max_pairs_per_prompt and max_tokens "
                             "must be >= 1")
        if min(self.caption_prompts, self.colour_swaps, self.omissions) < 0 or self.rambling_sentences < 1:
            raise ValueError("train.vlm.reward_model.caption_prompts, colour_swaps and omissions must be >= 0 and "
                             "rambling_sentences >= 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"train.vlm.reward_model.heldout_fraction must be in (0, 1) (e.g. 0.2), "
                             f"got {self.heldout_fraction}")
        if self.learning_rate < 0 or not self.head_learning_rate > 0:
            raise ValueError("train.vlm.reward_model.learning_rate must be >= 0 and head_learning_rate > 0")


@dataclasses.dataclass
class GroupResources:
    """What one long-lived worker group of the RL step asks Ray for (one actor per group here)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus <= 0:
            raise ValueError(f"a worker group needs num_cpus >= 0 and num_gpus >= 0, not both 0; got "
                             f"num_cpus={self.num_cpus}, num_gpus={self.num_gpus} "
                             "(e.g. train.vlm.rl.groups.actor.num_gpus=1 on a cluster)")


@dataclasses.dataclass
class RlGroups:
    """Resources of each worker group. Locally they share the machine's cores (colocated, fractional CPUs
    are fine); on a cluster `num_gpus` places each on a GPU."""

    rollout: GroupResources = dataclasses.field(default_factory=GroupResources)
    reference: GroupResources = dataclasses.field(default_factory=GroupResources)
    reward: GroupResources = dataclasses.field(default_factory=GroupResources)
    critic: GroupResources = dataclasses.field(default_factory=GroupResources)
    actor: GroupResources = dataclasses.field(default_factory=GroupResources)


@dataclasses.dataclass
class KindAdaptation:
    """`rl.kind_adaptation`: Seed-Thinking v1.5's online data-distribution adaptation, for the verifiable kinds
    of each batch. A kind's share follows 4 p (1 - p) of its running verifier pass rate p (`PromptSampler`): a
    kind the policy always fails or always passes gives all its samples one reward and teaches nothing, so it
    gets `floor`, enough to re-measure it. Off: kinds in proportion to their prompt pools."""

    enabled: bool = True
    floor: float = 0.1  # the least weight a kind keeps (against 1 at pass rate 0.5)
    momentum: float = 0.3  # how far a step's pass rate moves the running one

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"train.vlm.rl.kind_adaptation.floor must be in (0, 1] (e.g. 0.1), got {self.floor}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"train.vlm.rl.kind_adaptation.momentum must be in (0, 1] (e.g. 0.3), "
                             f"got {self.momentum}")


@dataclasses.dataclass
class RlConfig:
    """`vlm_rl`: hybrid RL of the SFT export (one driver loop over long-lived Ray worker groups)."""

    enabled: bool = True
    steps: int = 200  # policy updates (after value pretraining)
    value_pretrain_steps: int = 20  # critic-only steps on the SFT policy's rollouts before the policy moves
    prompts_per_step: int = 32
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"general": 0.3, "verifiable": 0.7})
    samples_per_prompt: int = 8  # n rollouts per prompt
    max_new_tokens: int = 1024  # the rollout limit; longer responses are cut (and counted)
    temperature: float = 1.0
    top_p: float = 1.0
    answer_mode: str = "thinking"  # the system prompt the policy answers under (components/vlm/modes.py)
    prompts_per_task: int = 512  # training-split prompts read per kind (the prompt pool)
    general_kinds: list[str] = dataclasses.field(default_factory=lambda: list(RL_GENERAL_KINDS))
    verifiable_kinds: list[str] = dataclasses.field(default_factory=lambda: list(RL_VERIFIABLE_KINDS))
    kind_adaptation: KindAdaptation = dataclasses.field(default_factory=KindAdaptation)
    actor_learning_rate: float = 1e-6
    critic_learning_rate: float = 5e-6
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["adapter", "llm"])  # of the policy
    updates_per_step: int = 1  # passes over each step's rollouts (PPO epochs)
    deepspeed: DeepSpeedSettings = dataclasses.field(default_factory=lambda: DeepSpeedSettings(bf16=True))  # actor, critic
    checkpoint_every: int = 10  # steps; the whole loop's state (actor, critic, optimisers, data position, RNG)
    max_restarts: int = 2  # worker groups recreated from the last checkpoint after an actor dies
    fail_at_step: int = -1  # testing only: the actor group's process exits once at this step (-1: never)
    algo: RlAlgoConfig = dataclasses.field(default_factory=RlAlgoConfig)
    groups: RlGroups = dataclasses.field(default_factory=RlGroups)

    def __post_init__(self) -> None:
        if set(self.mix) - set(PROMPT_TYPES) or not self.mix:
            raise ValueError(f"train.vlm.rl.mix needs weights for prompt types {list(PROMPT_TYPES)}, got keys "
                             f"{sorted(self.mix)}; e.g. {{general: 0.3, verifiable: 0.7}}")
        if any(w < 0 for w in self.mix.values()) or not any(w > 0 for w in self.mix.values()):
            raise ValueError(f"train.vlm.rl.mix weights must be >= 0 with at least one > 0, got {self.mix}")
        if min(self.steps, self.prompts_per_step, self.samples_per_prompt, self.max_new_tokens,
               self.prompts_per_task, self.updates_per_step, self.checkpoint_every) < 1:
            raise ValueError("train.vlm.rl.steps, prompts_per_step, samples_per_prompt, max_new_tokens, "
                             "prompts_per_task, updates_per_step and checkpoint_every must be >= 1")
        if self.value_pretrain_steps < 0 or self.max_restarts < 0:
            raise ValueError("train.vlm.rl.value_pretrain_steps and max_restarts must be >= 0")
        if self.samples_per_prompt < 2:
            raise ValueError(f"train.vlm.rl.samples_per_prompt must be >= 2 (the rollouts of one prompt are compared "
                             f"through the critic), got {self.samples_per_prompt}")
        if not self.temperature > 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"train.vlm.rl needs temperature > 0 (rollouts are sampled) and top_p in (0, 1], got "
                             f"temperature={self.temperature}, top_p={self.top_p}")
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"train.vlm.rl.answer_mode must be one of {list(ANSWER_MODES)}, got {self.answer_mode!r}")
        bad = sorted(set(self.general_kinds) - set(RL_GENERAL_KINDS))
        bad += sorted(set(self.verifiable_kinds) - set(RL_VERIFIABLE_KINDS))
        if bad:
            raise ValueError(f"train.vlm.rl: unknown prompt kind(s) {bad}; general_kinds are some of "
                             f"{list(RL_GENERAL_KINDS)}, verifiable_kinds some of {list(RL_VERIFIABLE_KINDS)}")
        for kind, kinds in (("general", self.general_kinds), ("verifiable", self.verifiable_kinds)):
            if self.mix.get(kind, 0.0) > 0 and not kinds:
                raise ValueError(f"train.vlm.rl.mix gives {kind} prompts weight {self.mix[kind]} but "
                                 f"train.vlm.rl.{kind}_kinds is empty: list kinds or set the weight to 0")
        bad_parts = sorted(set(self.trainable) - {"vit", "adapter", "llm"})
        if bad_parts or not self.trainable:
            raise ValueError(f"train.vlm.rl.trainable must be a non-empty list of [vit, adapter, llm], "
                             f"got {self.trainable}")
        if not self.actor_learning_rate > 0 or not self.critic_learning_rate > 0:
            raise ValueError("train.vlm.rl.actor_learning_rate and critic_learning_rate must be > 0")
        if self.algo.max_response_tokens < self.max_new_tokens:
            raise ValueError(f"train.vlm.rl.algo.max_response_tokens ({self.algo.max_response_tokens}) is below "
                             f"train.vlm.rl.max_new_tokens ({self.max_new_tokens}): every long rollout would be cut; "
                             "raise it to at least max_new_tokens")


@dataclasses.dataclass
class RewardModelJob:
    """What `reward_model` uses of `train.vlm`: its settings, the split, and the SFT round's frame count."""

    reward_model: RewardModelConfig
    holdout_fraction: float
    frames_per_clip: int


@dataclasses.dataclass
class RlJob:
    """What `vlm_rl` uses of `train.vlm`: its settings, the split, the SFT frame count, and the reward
    model's sequence limit (the reward group scores as the reward model was trained)."""

    rl: RlConfig
    holdout_fraction: float
    frames_per_clip: int
    rm_max_tokens: int
