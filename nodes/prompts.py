"""Prompt lists typed into node widgets: one prompt per line."""

from __future__ import annotations

from ..act import ActError


def parse_prompts(text: str, field: str) -> list[str]:
    """Prompts from a multiline widget: one per line; blank lines and `#` comments are skipped.

    Raises:
        ActError: no prompt is left (the message names the widget).
    """
    prompts = [line.strip() for line in (text or "").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ActError(f"{field} is empty: write one prompt per line")
    return prompts
