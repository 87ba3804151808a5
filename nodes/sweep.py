"""Nodes: Strength Sweep (one prompt at several strengths) and Labelled Grid."""

from __future__ import annotations

import re

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from ..act import ActError
from . import diffusion_model
from .apply import label, parts_of
from .types import CATEGORY, SEARCH_ALIASES, Transport

LABEL_HEIGHT = 28


def parse_strengths(text: str) -> list[float]:
    """Strengths from "0, 0.25, 0.5" (commas, spaces or new lines between them)."""
    words = [word for word in re.split(r"[,\s]+", text or "") if word]
    try:
        strengths = [float(word) for word in words]
    except ValueError:
        raise ActError(f"strengths must be numbers separated by commas, got {text!r}") from None
    if not strengths:
        raise ActError("strengths is empty: give a list such as 0, 0.5, 1")
    return strengths


def label_grid(images: torch.Tensor, labels: list[str], columns: int) -> torch.Tensor:
    """Tile images (B, H, W, 3) in `columns` columns, each with its label above it."""
    count, height, width, _ = images.shape
    columns = max(1, min(columns or count, count))
    rows = -(-count // columns)
    cell = height + LABEL_HEIGHT
    canvas = Image.new("RGB", (columns * width, rows * cell), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, LABEL_HEIGHT // 2))
    pixels = (images.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for index in range(count):
        left, top = (index % columns) * width, (index // columns) * cell
        canvas.paste(Image.fromarray(pixels[index]), (left, top + LABEL_HEIGHT))
        label = labels[index] if index < len(labels) else ""
        draw.text((left + 6, top + 6), label, fill="black", font=font)
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return grid.unsqueeze(0)


class StrengthSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTStrengthSweep",
            display_name="AcT Strength Sweep",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "strength sweep", "compare strengths", "xy plot"],
            description=(
                "Samples the same seed and prompt once per strength, so you can pick a strength "
                "by eye: decode the latents and feed them with the labels to AcT Labelled Grid. "
                "Sweeps the diffusion-model maps of the transport (for text-encoder maps, use "
                "AcT Apply once per strength)."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="Diffusion model (steered by the transport's diffusion-model maps).",
                ),
                Transport.Input("transport", tooltip="From Fit Transport or Load Transport."),
                io.Conditioning.Input(
                    "positive", tooltip="The prompt to render at every strength."
                ),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input(
                    "latent_image", tooltip="The latent to sample, e.g. Empty Latent Image."
                ),
                io.String.Input(
                    "strengths",
                    default="0, 0.25, 0.5, 0.75, 1",
                    tooltip="Strengths to render, separated by commas.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="One seed for every strength, so only the strength changes.",
                ),
                io.Int.Input(
                    "steps", default=20, min=1, max=10000, tooltip="Sampling steps, as in KSampler."
                ),
                io.Float.Input(
                    "cfg",
                    default=7.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance, as in KSampler.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler",
                    tooltip="Sampler, as in KSampler.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="normal",
                    tooltip="Scheduler, as in KSampler.",
                ),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="One sampled latent per strength (and per latent of the batch), in order.",
                ),
                io.String.Output(
                    display_name="labels",
                    tooltip="'strength 0.5 (...)' per image, one per line: connect to Labelled Grid's labels.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, model, transport, positive, negative, latent_image, strengths: str, seed: int,
        steps: int, cfg: float, sampler_name: str, scheduler: str,
    ) -> io.NodeOutput:  # fmt: skip
        values = parse_strengths(strengths)
        diffusion, _ = parts_of(transport, model, None)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        progress = SweepProgress(model, len(values))
        results = []
        for index, strength in enumerate(values):
            steered = diffusion_model.steered_model(model, diffusion, strength)
            results.append(
                comfy.sample.sample(
                    steered, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                    latent, callback=progress.callback(index),
                    disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
                )
            )  # fmt: skip
        labels = [label(transport, value, None, "") for value in values]
        labels = [text for text in labels for _ in range(latent.shape[0])]
        return io.NodeOutput({"samples": torch.cat(results)}, "\n".join(labels))


class SweepProgress:
    """One progress bar for a whole sweep, in sampling steps of all strengths together, with
    the sampler's latent previews (ComfyUI's own sampler callback would restart a bar of its
    own for every strength)."""

    def __init__(self, model, runs: int) -> None:
        self.runs = runs
        self.bar = comfy.utils.ProgressBar(runs)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(self, run: int):
        """The sampler callback of run number `run` (0-based)."""

        def update(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            preview = None
            if self.previewer is not None:
                first = x0.tensors[0] if x0.is_nested else x0
                preview = self.previewer.decode_latent_to_preview_image("JPEG", first)
            total = self.runs * total_steps
            self.bar.update_absolute(run * total_steps + step + 1, total, preview)

        return update


class LabelledGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTLabelledGrid",
            display_name="AcT Labelled Grid",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "labelled grid", "image grid", "label images"],
            description="Tiles a batch of images into one picture with a label above each (e.g. the strengths of a sweep).",
            inputs=[
                io.Image.Input(
                    "images",
                    tooltip="A batch of images, e.g. the decoded latents of a Strength Sweep.",
                ),
                io.String.Input(
                    "labels",
                    multiline=True,
                    default="",
                    tooltip="One label per line, in image order (connect Strength Sweep's labels, or type labels for images no AcT node made, e.g. 'without AcT').",
                ),
                io.Int.Input(
                    "columns",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="Images per row; 0 puts them all in one row.",
                ),
                io.String.Input(
                    "more_labels",
                    optional=True,
                    force_input=True,
                    tooltip="Labels for the images after those of labels, one per line: connect AcT Apply's label, so the picture says which strength made it.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="IMAGE", tooltip="One picture: the images in a grid, labelled."
                )
            ],
        )

    @classmethod
    def execute(
        cls, images: torch.Tensor, labels: str, columns: int, more_labels: str = ""
    ) -> io.NodeOutput:
        lines = (labels or "").splitlines() + (more_labels or "").splitlines()
        return io.NodeOutput(label_grid(images, lines, columns))
