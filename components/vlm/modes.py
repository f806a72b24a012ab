"""The two answer modes of the SFT model, selected by the system prompt: thinking (a `<think>...</think>`
span of reasoning, then the answer) and direct (the answer alone). These strings are defined here once:
the SFT data (`components/vlm/sft_data.py`), the evaluation in both modes and the serving config's
thinking switch (`components/serve/config.py`) all read them, so a served request in either mode sees
exactly the system prompt its mode was trained with."""

from __future__ import annotations

THINKING_SYSTEM_PROMPT = ("You are a helpful assistant. Think the question through step by step inside "
                          "<think> and </think>, then give the answer.")
DIRECT_SYSTEM_PROMPT = "You are a helpful assistant. Give the answer directly."
MODES = {"thinking": THINKING_SYSTEM_PROMPT, "direct": DIRECT_SYSTEM_PROMPT}


def system_prompt(mode: str) -> str:
    """The system prompt of `mode` ("thinking" or "direct")."""
    if mode not in MODES:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {sorted(MODES)}")
    return MODES[mode]
