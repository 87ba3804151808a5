"""Train the shapes-world pipeline from scratch on CPU: the VAE, then text encoder + UNet.

Run from the repository root (the machine is shared: be nice):

    nohup nice -n 19 python -m bench.shapes.train --out bench/shapes/model > train.log &

Stages: render the training scenes (fixed by --seed), train the VAE, encode the scenes to
latents, train the text encoder and UNet together on the noise-prediction loss (min-SNR
weighted, captions dropped 10% of the time for classifier-free guidance, EMA weights; two
learning-rate cycles), fine-tune the VAE decoder alone on those latents, then save the pipeline
with `save_pretrained`. Every batch is a pure function of (seed, step), so a run stopped and
resumed from --work-dir (rerun the same command) trains the same model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from act.files import cache_dir

from .captions import training_caption
from .model import (
    MODEL_DIR,
    assemble,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    save_pipeline,
    training_scheduler,
)
from .optimise import optimise
from .world import render_many, sample_records

THREADS_HELP = (
    "torch threads; keep 1 on a busy shared machine: with 2, OpenMP threads spin-wait for "
    "each other when one is descheduled (a step measured 40× slower under nice -n 19)"
)
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
KL_WEIGHT = 1e-6


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights (saved next to them)."""

    seed: int = 0
    scenes: int = 20000
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    steps: int = 5000
    batch: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    extra_steps: int = 4000
    extra_lr: float = 3e-4
    decoder_steps: int = 2000
    decoder_lr: float = 5e-4


def _images(settings: Settings) -> torch.Tensor:
    """(N, 3, 32, 32) training scenes in [-1, 1]."""
    images = render_many(sample_records(settings.scenes, settings.seed))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + squared error (the square weighs wrong colours over texture detail)."""
    return F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target)


def train_vae(images: torch.Tensor, settings: Settings, work_dir: Path):
    """The autoencoder: reconstruction error + KL (weight 1e-6 per latent sum) on the scenes."""
    torch.manual_seed(settings.seed)
    vae = build_vae()

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        batch = images[torch.randint(len(images), (settings.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator
        )
        reconstruction = vae.decode(latents).sample
        return _reconstruction_error(reconstruction, batch) + KL_WEIGHT * posterior.kl().mean()

    seconds = optimise(
        "vae", work_dir / "vae.pt", {"vae": vae}, settings.vae_lr, settings.vae_steps, loss_at
    )
    return vae, seconds


@torch.no_grad()
def encode(vae, images: torch.Tensor, work_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of all scenes (cached in `work_dir`)."""
    path = work_dir / "latents.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["mean"], cached["std"]
    means, stds = [], []
    for chunk in images.split(256):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, path)
    return mean, std


def train_diffusion(
    latent_mean: torch.Tensor, latent_std: torch.Tensor, settings: Settings, work_dir: Path
):
    """Text encoder and UNet, jointly, on min-SNR-weighted noise prediction: `steps` on one
    learning-rate cycle, then `extra_steps` on a second (a warm restart at `extra_lr`; the EMA
    carries on). Returns the EMA copies, the latent scaling factor and the training seconds."""
    records = sample_records(settings.scenes, settings.seed)
    tokenizer = build_tokenizer()
    torch.manual_seed(settings.seed)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    ema = {"text_encoder": copy.deepcopy(text_encoder), "unet": copy.deepcopy(unet)}
    live = {"text_encoder": text_encoder, "unet": unet}
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod
    scale = 1.0 / latent_mean.std().item()

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        rng = np.random.default_rng([settings.seed, step])
        index = torch.randint(len(records), (settings.batch,), generator=generator)
        captions = [
            "" if rng.random() < CAPTION_DROPOUT else training_caption(records[i], rng)
            for i in index.tolist()
        ]
        tokens = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        sample = torch.randn(latent_mean[index].shape, generator=generator)
        latents = latent_mean[index] + latent_std[index] * sample
        timesteps = torch.randint(len(alphas), (settings.batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents * scale, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(tokens.input_ids)[0]).sample
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        return (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    ema_parameters = [p for module in ema.values() for p in module.parameters()]
    live_parameters = [p for module in live.values() for p in module.parameters()]

    @torch.no_grad()
    def update_ema() -> None:
        torch._foreach_lerp_(ema_parameters, live_parameters, 1 - settings.ema_decay)

    modules = live | {f"ema_{key}": module for key, module in ema.items()}
    seconds = optimise(
        "diffusion",
        work_dir / "diffusion.pt",
        modules,
        settings.lr,
        settings.steps,
        loss_at,
        after_step=update_ema,
    )
    if settings.extra_steps:  # a warm restart: fresh optimiser and schedule, new batches
        seconds += optimise(
            "diffusion, second cycle",
            work_dir / "diffusion-2.pt",
            modules,
            settings.extra_lr,
            settings.extra_steps,
            lambda step: loss_at(settings.steps + step),
            after_step=update_ema,
        )
    return ema["text_encoder"], ema["unet"], scale, seconds


def finetune_decoder(
    vae,
    images: torch.Tensor,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    settings: Settings,
    work_dir: Path,
) -> float:
    """The VAE decoder alone, on samples of the frozen encoder's posteriors: sharper small
    shapes, and the UNet's latents stay valid. Returns the training seconds.

    **Mutates** `vae` (its decoder and post-quantisation convolution)."""
    decoder = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        index = torch.randint(len(images), (settings.vae_batch,), generator=generator)
        sample = torch.randn(latent_mean[index].shape, generator=generator)
        reconstruction = vae.decode(latent_mean[index] + latent_std[index] * sample).sample
        return _reconstruction_error(reconstruction, images[index])

    return optimise(
        "decoder",
        work_dir / "decoder.pt",
        decoder,
        settings.decoder_lr,
        settings.decoder_steps,
        loss_at,
    )


def train(settings: Settings, work_dir: Path, out: Path) -> dict:
    """All stages; saves the pipeline to `out` and returns the timings written beside it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    recorded = work_dir / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != asdict(settings):
        raise ValueError(
            f"{work_dir} holds a run with other settings ({recorded.read_text().strip()}); "
            "rerun with those, or give a fresh --work-dir"
        )
    recorded.write_text(json.dumps(asdict(settings)))
    images = _images(settings)
    vae, vae_seconds = train_vae(images, settings, work_dir)
    tick = time.perf_counter()
    latent_mean, latent_std = encode(vae, images, work_dir)
    encode_seconds = time.perf_counter() - tick
    text_encoder, unet, scale, diffusion_seconds = train_diffusion(
        latent_mean, latent_std, settings, work_dir
    )
    decoder_seconds = finetune_decoder(vae, images, latent_mean, latent_std, settings, work_dir)
    vae.register_to_config(scaling_factor=scale)
    pipe = assemble(vae, text_encoder, build_tokenizer(), unet)  # fresh: no padding state
    save_pipeline(pipe, out)
    report = {
        "settings": asdict(settings),
        "minutes": {
            "vae": round(vae_seconds / 60, 1),
            "encode": round(encode_seconds / 60, 1),
            "diffusion": round(diffusion_seconds / 60, 1),
            "decoder": round(decoder_seconds / 60, 1),
        },
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="pipeline folder")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=cache_dir() / "shapes-training",
        help="checkpoints, to resume from (default: a folder in the user's cache)",
    )
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(**{field: getattr(args, field) for field in asdict(defaults)})
    print(json.dumps(train(settings, args.work_dir, args.out)["minutes"]))


if __name__ == "__main__":
    main()
