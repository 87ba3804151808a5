"""Regional steering: a MASK restricts the diffusion model's transport to part of the picture.

At every steered site the mask is resized (area average) to the site's spatial size: the
height and width of channel maps (B, C, H, W) and video maps (B, C, T, H, W), or the token
grid of image tokens (B, N, D), which is the latent's (H, W) halved per UNet level, or the
latent divided into the DiT's patches (row-major, frames first). Activations where the resized
mask is 0 stay bit-identical; elsewhere `a + m (T(a) - a)`. Text-token streams (as many tokens
as the prompt's conditioning) have no place in the picture and are left unsteered; a tensor
whose layout is neither is refused with the site's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..act import ActError, Transport
from ..act.claims import claim, release
from ..act.hooks import (
    check_fingerprint,
    check_width,
    group_by_module,
    holds_channels,
    pick_output,
    replace_output,
    resolve_module,
)
from ..act.maps import Coefficients
from ..act.steering import transported


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK, (H, W) or (B, H, W), as float (B, 1, H, W).

    Raises:
        ActError: the mask has another shape.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or min(mask.shape) == 0:
        raise ActError(f"mask: expected a MASK of shape (B, H, W), got {tuple(mask.shape)}")
    return mask.float().unsqueeze(1)


def resized(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`mask` (B, 1, H, W) resized to `size` (h, w) by area averaging."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="area")


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one model call lie: the token grids (frames, height, width) image
    tokens can have, and the prompt's token count."""

    grids: tuple[tuple[int, int, int], ...]
    text_tokens: int | None

    @classmethod
    def of_call(cls, diffusion_model: nn.Module, latent: torch.Tensor, context: Any) -> TokenLayout:
        """The layout of one call: a UNet's levels (the latent halved per level) or a DiT's
        patches of `patch_size`."""
        spatial = list(latent.shape[2:])
        frames = spatial[0] if len(spatial) == 3 else 1
        height, width = spatial[-2:]
        grids = []
        if hasattr(diffusion_model, "input_blocks"):
            while height >= 1 and width >= 1 and len(grids) < 8:
                grids.append((1, height, width))
                if height == 1 and width == 1:
                    break
                height, width = math.ceil(height / 2), math.ceil(width / 2)
        else:
            patch = getattr(diffusion_model, "patch_size", 1)
            sizes = list(patch) if isinstance(patch, list | tuple) else [int(patch)] * 2
            sizes = [1] * (3 - len(sizes)) + sizes[-3:]
            grids.append(
                tuple(math.ceil(n / p) for n, p in zip((frames, height, width), sizes, strict=True))
            )
        text = context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        return cls(tuple(grids), text)

    def grid(self, tokens: int) -> tuple[int, int, int] | None:
        return next((grid for grid in self.grids if math.prod(grid) == tokens), None)


class MaskedSteering:
    """Forward hooks transporting a model's sites inside a mask only; a context manager.

    `rows(batch)` gives the index expressions to steer (None: the whole tensor). `calls`
    counts the module calls that were steered.
    """

    def __init__(
        self,
        model: nn.Module,
        transport: Transport,
        strength: float,
        mask: torch.Tensor,
        layout: TokenLayout,
        rows: Callable[[int], Sequence[Any]] | None = None,
    ) -> None:
        if transport.module_params:
            check_fingerprint(model, transport.module_params, transport.model_class)
        groups = group_by_module(transport.sites)
        modules = {name: resolve_module(model, name) for name in groups}
        self.transport, self.strength, self.mask = transport, strength, mask
        self.layout, self.rows = layout, rows
        self.calls = 0
        self._coefficients: dict[tuple[str, torch.device], Coefficients] = {}
        self._modules = list(modules.values())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        claim(modules, id(self))
        for name, sites in groups.items():
            hook = self._hook([(site, index) for site, index in sites])
            self._handles.append(modules[name].register_forward_hook(hook))

    def __enter__(self) -> MaskedSteering:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()
        release(self._modules, id(self))

    def _hook(self, sites: list[tuple[str, int | None]]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self.calls += 1
            for site, index in sites:
                tensor = pick_output(output, index, site)
                moved = self._steered(module, site, tensor)
                if moved is not None:
                    output = replace_output(output, index, moved)
            return output

        return hook

    def _steered(self, module: nn.Module, site: str, tensor: torch.Tensor) -> torch.Tensor | None:
        module_map = self.transport.maps[site]
        channels = holds_channels(module, tensor, site)
        check_width(tensor, module_map.units, site, channels)
        key = (site, tensor.device)
        if key not in self._coefficients:
            self._coefficients[key] = module_map.coefficients(self.strength).to(tensor.device)
        selected = [slice(None)] if self.rows is None else self.rows(tensor.shape[0])
        result = None
        for rows in selected:
            region = tensor[rows]
            weight = self.weight(site, region, channels)
            if weight is None:
                continue
            moved = transported(region, self._coefficients[key], channels).float()
            blended = region.float() + weight * (moved - region.float())
            if result is None:
                result = tensor.clone()
            result[rows] = torch.where(weight > 0, blended.to(tensor.dtype), region)
        return result

    def weight(self, site: str, region: torch.Tensor, channels: bool) -> torch.Tensor | None:
        """The mask at the layout of `region`, broadcastable to it; None for a text-token
        stream (left unsteered).

        Raises:
            ActError: the region's layout is unknown, or the mask's batch does not fit.
        """
        mask = self.mask.to(region.device)
        if mask.shape[0] not in (1, region.shape[0]):
            raise ActError(
                f"mask: {mask.shape[0]} masks for a batch of {region.shape[0]} images; give "
                "one mask, or one per image"
            )
        if channels and region.ndim in (4, 5):
            weight = resized(mask, tuple(region.shape[-2:]))
            return weight.unsqueeze(2) if region.ndim == 5 else weight
        if region.ndim == 3 and not channels:
            tokens = region.shape[1]
            grid = self.layout.grid(tokens)
            if grid is not None:
                frames, height, width = grid
                weight = resized(mask, (height, width)).flatten(2).repeat(1, 1, frames)
                return weight.transpose(1, 2)
            if tokens == self.layout.text_tokens:
                return None
        raise ActError(
            f"mask: cannot tell where the activations of {site!r} {tuple(region.shape)} lie in "
            f"the picture (image token grids {list(self.layout.grids)}, "
            f"{self.layout.text_tokens} text tokens), so the mask cannot restrict it; steer "
            "without a mask, or fit the transport on channel maps or image-token layers"
        )
