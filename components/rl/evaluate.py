"""The evaluation of the RL export (`vlm_eval_rl`): the SFT export's evaluation (`run_eval_sft`: each score
beside its shuffled-image control, thinking answers scored after their reasoning), run on the RL policy in
the modes RL trained (`rl_eval_view`: direct only when RL rolled out in direct mode), so the two steps'
`eval_<mode>/*` metrics compare one to one (`benchmarks/vlm_results.py`'s `rl` rows against its `sft` rows)."""

from __future__ import annotations

from components.common.contract import StageContext, StageResult, component
from components.vlm.config import VlmEvalJob, rl_eval_view
from components.vlm.evaluate import run_eval_sft


def run_eval_rl(ctx: StageContext[VlmEvalJob]) -> StageResult:
    """`run_eval_sft` on the RL export; the same metrics, in this step's own MLflow run."""
    return run_eval_sft(ctx)


vlm_eval_rl = component(name="vlm_eval_rl", version="1", config="train.vlm", inputs=("shards", "vlm"),
                        outputs=("eval",), view=rl_eval_view)(run_eval_rl)


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(vlm_eval_rl))
