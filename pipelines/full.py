"""The whole pipeline, in the order of DESIGN.md: synthetic crawl -> ingest -> (model captions for images
without a usable one, when configured ->) basic filters ->
(CLIP scorer training ->) CLIP-score filter -> dedup -> rebalance, plus OCR synthesis,
grounding/counting synthesis and video samples (real videos captioned by a model when configured) -> WebDataset
shards by task type -> Seed-ViT
pretraining (MIM, SigLIP, video; Ray Train + DeepSpeed) -> its retrieval evaluation -> a text-pretrained
MoE LLM -> VLM stages 0, 1, 2 (each evaluated by its own step) -> SFT (conversations in a thinking and a
direct mode, a first round, rejection sampling with the verifiers, a second round; evaluated in both modes) -> a reward
model (Bradley-Terry on our own preference pairs) -> hybrid RL (reward model and verifiers in every batch, one
driver loop over Ray worker groups; evaluated as SFT is) -> `serve`: the final checkpoint registered in the MLflow
model registry and deployed on Ray Serve behind an OpenAI-style chat endpoint on 127.0.0.1:8000.

    python pipelines/full.py                                  # tiny profile, local Ray, local MLflow
    ray job submit --working-dir . -- python pipelines/full.py --profile full
    python pipelines/full.py --only basic_filters --set data.basic_filters.min_short_side=128
    python pipelines/full.py --from ingest --experiment strict_filters
    python pipelines/full.py --until clip_filter --set data.synthetic_crawl.num_samples=5000
    python pipelines/full.py --set serve.keep_alive=false    # end the endpoint with the pipeline

Stages later issues build are added here when they exist; none is faked.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from components.common.config import ConfigError  # noqa: E402
from components.data.basic_filters import basic_filters  # noqa: E402
from components.data.clip_filter import clip_filter  # noqa: E402
from components.data.clip_scorer import clip_scorer  # noqa: E402
from components.data.dedup import dedup  # noqa: E402
from components.data.grounding_samples import grounding_samples  # noqa: E402
from components.data.image_captions import image_captions  # noqa: E402
from components.data.ingest import ingest  # noqa: E402
from components.data.ocr_samples import ocr_samples  # noqa: E402
from components.data.rebalance import rebalance  # noqa: E402
from components.data.write_shards import write_shards  # noqa: E402
from components.data.synthetic_crawl import synthetic_crawl  # noqa: E402
from components.data.video_captions import video_captions  # noqa: E402
from components.data.video_samples import video_samples  # noqa: E402
from components.serve.deploy import keep_endpoint_up, serve_step  # noqa: E402
from components.vit.vit_eval import vit_eval  # noqa: E402
from components.vit.vit_pretrain import vit_pretrain  # noqa: E402
from components.vlm.evaluate import vlm_eval_sft, vlm_eval_stage0, vlm_eval_stage1, vlm_eval_stage2  # noqa: E402
from components.rl.driver import vlm_rl  # noqa: E402
from components.rl.evaluate import vlm_eval_rl  # noqa: E402
from components.rl.reward_model import reward_model  # noqa: E402
from components.vlm.rejection_sampling import rejection_sampling  # noqa: E402
from components.vlm.sft_data import sft_data  # noqa: E402
from components.vlm.stages import llm_pretrain, vlm_sft, vlm_sft_rs, vlm_stage0, vlm_stage1, vlm_stage2  # noqa: E402
from components.schema import PipelineConfig, available, load_config  # noqa: E402
from pipelines.runner import PipelineConfigError, PipelineError, PipelineRunner, Selection, Step  # noqa: E402

def video_enabled(config: PipelineConfig) -> bool:
    return config.data.video.enabled and (config.data.video.synthetic_clips > 0 or bool(config.data.video.sources))


def vlm_stage_enabled(config: PipelineConfig, stage: str) -> bool:
    return config.train.vit_pretrain.enabled and getattr(config.train.vlm, stage).enabled


def vlm_eval_enabled(config: PipelineConfig, stage: str) -> bool:
    return vlm_stage_enabled(config, stage) and config.train.vlm.eval.enabled


def sft_enabled(config: PipelineConfig) -> bool:
    vlm = config.train.vlm
    return vlm_stage_enabled(config, "stage2") and vlm.sft_data.enabled and vlm.sft.enabled


def sft_rs_enabled(config: PipelineConfig) -> bool:
    return sft_enabled(config) and config.train.vlm.rejection_sampling.enabled and config.train.vlm.sft_rs.enabled


def reward_model_enabled(config: PipelineConfig) -> bool:
    return sft_rs_enabled(config) and config.train.vlm.reward_model.enabled


def rl_enabled(config: PipelineConfig) -> bool:
    return reward_model_enabled(config) and config.train.vlm.rl.enabled


def eval_inputs(stage: str) -> dict:
    return {"shards": ("write_shards", "shards"), "vlm": (f"vlm_{stage}", "vlm")}


VLM_STAGES = ("stage0", "stage1", "stage2")
VLM_INPUTS: dict = {"shards": ("write_shards", "shards"), "vit": ("vit_pretrain", "vit"), "llm": ("llm_pretrain", "llm")}
SFT_EXPORTS = [("vlm_sft_rs", "vlm"), ("vlm_sft", "vlm")]  # the last SFT round that ran
CURATED = [("dedup", "samples"), ("clip_filter", "samples"), ("basic_filters", "samples")]  # the first enabled
STEPS = [
    Step(synthetic_crawl, enabled=lambda config: config.data.synthetic_crawl.enabled),
    Step(ingest, inputs={"crawl": ("synthetic_crawl", "shards")}),
    Step(image_captions, inputs={"samples": ("ingest", "samples")},
         enabled=lambda config: config.data.image_captions.enabled),
    Step(basic_filters, inputs={"samples": [("image_captions", "samples"), ("ingest", "samples")]}),
    Step(clip_scorer, enabled=lambda config: config.data.clip_scorer.enabled),
    Step(clip_filter, inputs={"samples": ("basic_filters", "samples"), "scorer": ("clip_scorer", "scorer")},
         enabled=lambda config: config.data.clip_filter.enabled),
    Step(dedup, inputs={"samples": [("clip_filter", "samples"), ("basic_filters", "samples")]},
         enabled=lambda config: config.data.dedup.enabled),
    Step(rebalance, inputs={"samples": CURATED}, enabled=lambda config: config.data.rebalance.enabled),
    Step(ocr_samples, enabled=lambda config: config.data.ocr.enabled and config.data.ocr.num_samples > 0),
    Step(grounding_samples,
         enabled=lambda config: config.data.grounding.enabled and config.data.grounding.num_samples > 0),
    Step(video_samples, enabled=lambda config: video_enabled(config)),
    Step(video_captions, inputs={"samples": ("video_samples", "samples")},
         enabled=lambda config: video_enabled(config) and config.data.video_captions.enabled),
    Step(write_shards, inputs={"samples": [("rebalance", "samples"), *CURATED], "ocr": ("ocr_samples", "samples"),
                               "grounding": ("grounding_samples", "samples"),
                               "video": [("video_captions", "samples"), ("video_samples", "samples")]}),
    Step(vit_pretrain, inputs={"shards": ("write_shards", "shards"), "scorer": ("clip_scorer", "scorer")},
         enabled=lambda config: config.train.vit_pretrain.enabled),
    Step(vit_eval, inputs={"shards": ("write_shards", "shards"), "vit": ("vit_pretrain", "vit")},
         enabled=lambda config: config.train.vit_pretrain.enabled and config.train.vit_eval.enabled),
    Step(llm_pretrain, inputs={"shards": ("write_shards", "shards")},
         enabled=lambda config: config.train.vlm.llm_pretrain.enabled and not config.train.vlm.llm.pretrained_path),
    Step(vlm_stage0, inputs=VLM_INPUTS, enabled=lambda config: vlm_stage_enabled(config, "stage0")),
    Step(vlm_eval_stage0, inputs=eval_inputs("stage0"), enabled=lambda config: vlm_eval_enabled(config, "stage0")),
    Step(vlm_stage1, inputs={**VLM_INPUTS, "previous": ("vlm_stage0", "vlm")},
         enabled=lambda config: vlm_stage_enabled(config, "stage1")),
    Step(vlm_eval_stage1, inputs=eval_inputs("stage1"), enabled=lambda config: vlm_eval_enabled(config, "stage1")),
    Step(vlm_stage2, inputs={**VLM_INPUTS, "previous": [("vlm_stage1", "vlm"), ("vlm_stage0", "vlm")]},
         enabled=lambda config: vlm_stage_enabled(config, "stage2")),
    Step(vlm_eval_stage2, inputs=eval_inputs("stage2"), enabled=lambda config: vlm_eval_enabled(config, "stage2")),
    Step(sft_data, inputs={"shards": ("write_shards", "shards")}, enabled=sft_enabled),
    Step(vlm_sft, inputs={"sft": ("sft_data", "sft"), "previous": ("vlm_stage2", "vlm")}, enabled=sft_enabled),
    Step(rejection_sampling, inputs={"shards": ("write_shards", "shards"), "vlm": ("vlm_sft", "vlm")},
         enabled=sft_rs_enabled),
    Step(vlm_sft_rs, inputs={"sft": ("sft_data", "sft"), "rs": ("rejection_sampling", "samples"),
                             "previous": ("vlm_sft", "vlm")}, enabled=sft_rs_enabled),
    Step(vlm_eval_sft, inputs={"shards": ("write_shards", "shards"), "vlm": [("vlm_sft_rs", "vlm"), ("vlm_sft", "vlm")]},
         enabled=lambda config: sft_enabled(config) and config.train.vlm.eval.enabled),
    Step(reward_model, inputs={"shards": ("write_shards", "shards"), "rs": ("rejection_sampling", "samples"),
                               "vlm": SFT_EXPORTS}, enabled=reward_model_enabled),
    Step(vlm_rl, inputs={"shards": ("write_shards", "shards"), "vlm": SFT_EXPORTS,
                         "reward_model": ("reward_model", "reward_model")}, enabled=rl_enabled),
    Step(vlm_eval_rl, inputs={"shards": ("write_shards", "shards"), "vlm": ("vlm_rl", "vlm")},
         enabled=lambda config: rl_enabled(config) and config.train.vlm.eval.enabled),
    Step(serve_step, inputs={"vlm": [("vlm_rl", "vlm"), ("vlm_sft_rs", "vlm"), ("vlm_sft", "vlm"), ("vlm_stage2", "vlm"),
                                     ("vlm_stage1", "vlm"), ("vlm_stage0", "vlm")],
                             "eval": [("vlm_eval_rl", "eval"), ("vlm_eval_sft", "eval"),
                                      *((f"vlm_eval_{stage}", "eval") for stage in reversed(VLM_STAGES))]},  # its scores
         enabled=lambda config: config.serve.enabled and any(vlm_stage_enabled(config, s) for s in VLM_STAGES),
         cached=False),
]
STEP_NAMES = [step.name for step in STEPS]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help=f"one of {available('profiles')} or a YAML path")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help=f"overlay(s) applied in order: {available('experiments')} or YAML paths")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                        help="override one config value (YAML syntax), e.g. data.shards.samples_per_shard=64")
    parser.add_argument("--only", action="append", default=[], choices=STEP_NAMES,
                        help="run only this step (repeatable); everything upstream must be cached")
    parser.add_argument("--from", dest="from_step", choices=STEP_NAMES,
                        help="rerun this step and every later one")
    parser.add_argument("--until", choices=STEP_NAMES, help="stop after this step (its upstream runs or is cached)")
    parser.add_argument("--force", action="append", default=[], choices=STEP_NAMES,
                        help="rerun this step even if it is cached (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, layered = load_config(args.profile, args.experiment, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        from components.common.config import dump_yaml

        print(dump_yaml(config))
        return 0
    selection = Selection(only=tuple(args.only), from_step=args.from_step, force=tuple(args.force),
                          until=args.until)
    runner = PipelineRunner(STEPS, config, layered, selection)
    try:
        outcomes = runner.run(["pipelines/full.py", *(argv or sys.argv[1:])])
    except PipelineConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:
        print(f"pipeline error: {error}", file=sys.stderr)
        if runner.report_path:
            print(f"run report (steps so far): {runner.report_path}", file=sys.stderr)
        return 2
    print_summary(config, outcomes, runner.report_path)
    served = [o for o in outcomes if o.name == "serve" and o.status == "ran"]
    if served:
        keep_endpoint_up(config.serve, bool(config.ray.address or os.environ.get("RAY_ADDRESS")),
                         Path(served[0].output_dir), "registered_version" in served[0].metrics)
    return 0


def print_summary(config: PipelineConfig, outcomes: list, report: Path | None = None) -> None:
    print(f"\n{'step':<16} {'status':<8} {'seconds':>8}  output")
    for outcome in outcomes:
        print(f"{outcome.name:<16} {outcome.status:<8} {outcome.duration_s:>8.1f}  {outcome.output_dir}")
    print(f"\nMLflow: {config.tracking_uri} (experiment {config.mlflow.experiment!r}; in the UI pick "
          "'Model training', or open #/experiments/<id>/runs)")
    if report is not None:
        print(f"Run report: {report} (also the parent run's artifact report/report.html)")


if __name__ == "__main__":
    sys.exit(main())
