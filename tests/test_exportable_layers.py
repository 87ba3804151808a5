"""The layer choice that folds completely: preset "exportable" (diffusers) and the Collect
node's "exportable (folds into a LoRA)".

A transport fitted on those sites with support "all" (Linear-AcT or Mean-AcT) exports as a
LoRA file with nothing left out, and that file, added to the weights at strength s, steers as
hooks do at s. Diffusers: tiny SD1.5-, FLUX- and SD3-shaped pipelines, float32 on the CPU,
sampled latents within 1e-5 of their largest magnitude (the float32 rounding of a folded
weight against a hooked output). ComfyUI (skipped unless COMFYUI_PATH names a checkout): the
choice resolves to sites that all fold on every family that has them and is refused with the
model's class on those that have none; Collect, Fit, Export LoRA and ComfyUI's own LoraLoader
(and AcT Bake) agree with AcT Apply.
"""

from __future__ import annotations

import importlib
import shutil
from types import SimpleNamespace

import pytest
import torch
from comfy_support import (
    PACK,
    encode,
    own_model_folders,
    pack_nodes,
    sample,
    start_once,
    temporary_base,
    tiny_clip,
    tiny_model,
)
from diffusion_fixtures import (
    SOURCE,
    TARGET,
    flux_pipeline,
    options,
    sd3_pipeline,
    sd_pipeline,
)
from safetensors import safe_open
from torch import nn

import act
from act import ActError, select_modules
from act.diffusers.anatomy import component_names, pipeline_root

TOLERANCE = 1e-5  # of the latents' largest magnitude


PIPELINES = {"sd15": sd_pipeline, "flux": flux_pipeline, "sd3": sd3_pipeline}
# The modules the preset chooses in the first block of each denoiser (of the text encoders:
# CLIP's LayerNorms; T5 has none).
FIRST_BLOCK = {
    "sd15": ("unet.down_blocks.0.attentions.0.transformer_blocks.0", {"norm1", "norm2", "norm3"}),
    "flux": ("transformer.transformer_blocks.0",
             {"attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"}),
    "sd3": ("transformer.transformer_blocks.0",
            {"attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"}),
}  # fmt: skip


def _pipeline_options(kind: str, pipe) -> dict:
    extra = {"max_sequence_length": 16, "guidance_scale": 5.0} if kind == "sd3" else {}
    return options(pipe, **extra)


def _latents(pipe, kind: str) -> torch.Tensor:
    kwargs = _pipeline_options(kind, pipe)
    kwargs.pop("progress")
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", generator=generator, output_type="latent", **kwargs).images


def _add_lora(pipe, path, strength: float) -> None:
    """Add the file's differences times `strength` to the pipeline's weights, as a loader
    does (`<component>.<module>.diff` -> `.weight`, `.diff_b` -> `.bias`)."""
    with safe_open(str(path), "pt") as file, torch.no_grad():
        for key in file.keys():  # noqa: SIM118 (safe_open has no __iter__)
            name, _, kind = key.rpartition(".")
            component, _, module = name.partition(".")
            parameter = pipe.components[component].get_parameter(
                f"{module}.{'weight' if kind == 'diff' else 'bias'}"
            )
            parameter.add_(strength * file.get_tensor(key))


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def fitted(request):
    """A pipeline and its samples on the exportable sites of both parts, support "all"."""
    kind = request.param
    pipe = PIPELINES[kind]()
    samples = act.collect_pipeline(
        pipe, SOURCE, TARGET, where="both", layers="exportable", support="all",
        **_pipeline_options(kind, pipe),
    )  # fmt: skip
    return SimpleNamespace(kind=kind, pipe=pipe, samples=samples)


def test_the_preset_chooses_the_foldable_sites_of_each_component(fitted):
    sites = fitted.samples.sites
    block, chosen = FIRST_BLOCK[fitted.kind]
    assert {s.removeprefix(f"{block}.") for s in sites if s.startswith(f"{block}.")} == chosen
    assert any(s.startswith("text_encoder.") and s.endswith("layers.0.layer_norm1") for s in sites)
    assert not any(s.startswith(("transformer.single_transformer_blocks", "text_encoder_3"))
                   for s in sites)  # fmt: skip
    if fitted.kind == "flux":  # its text_encoder_2 is a T5
        assert not any(s.startswith("text_encoder_2.") for s in sites)


@pytest.mark.parametrize(("method", "strength"), [("linear", 0.5), ("linear", 1.0), ("mean", 1.0)])
def test_an_exportable_transport_exports_whole_and_its_lora_equals_steering(
    fitted, tmp_path, method, strength
):
    pipe, kind = fitted.pipe, fitted.kind
    transport = fitted.samples.fit(method, "all")
    written = act.export_lora(transport, pipe, tmp_path / "style.safetensors")
    assert sorted(written.folded) == sorted(transport.sites) and not written.left_out
    plain = _latents(pipe, kind)
    with act.steer(pipe, transport, strength, cond_only=False):
        steered = _latents(pipe, kind)
    state = {name: module.state_dict() for name, module in pipe.components.items()
             if isinstance(module, nn.Module)}  # fmt: skip
    state = {name: {k: v.clone() for k, v in part.items()} for name, part in state.items()}
    try:
        _add_lora(pipe, written.path, strength)
        loaded = _latents(pipe, kind)
    finally:
        for name, part in state.items():
            pipe.components[name].load_state_dict(part)
    scale = steered.abs().max()
    assert (loaded - steered).abs().max() <= TOLERANCE * scale
    assert (steered - plain).abs().max() > 100 * TOLERANCE * scale  # the transport steers


def test_a_component_without_foldable_modules_is_refused_with_its_class():
    pipe = flux_pipeline()
    t5_only = nn.ModuleDict({"text_encoder_2": pipe.text_encoder_2})
    with pytest.raises(ActError, match=r"text_encoder_2 \(T5EncoderModel\)"):
        select_modules(t5_only, "exportable", family="diffusers")
    with torch.no_grad():
        for block in pipe.transformer.transformer_blocks:
            block.attn.to_out[0].bias = None
            block.attn.to_add_out.bias = None
            block.ff.net[2].bias = None
            block.ff_context.net[2].bias = None
    root = pipeline_root(pipe, component_names(pipe, "both"))
    with pytest.raises(ActError, match=r"transformer \(FluxTransformer2DModel\).*layers="):
        select_modules(root, "exportable", family="diffusers")


# ----- ComfyUI ----------------------------------------------------------------------------

THINGS = ("cat", "dog", "house", "tree")
# Families whose exportable sites fold, and those with none (no biases, or joint tokens).
FOLDING = ["sd15", "sdxl", "flux", "flux_schnell", "chroma", "hunyuan_image", "sd3", "wan",
           "qwen_image", "pixart_sigma", "hydit"]  # fmt: skip
NOT_FOLDING = ["flux2", "lumina2", "z_image", "auraflow"]


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI once per process (an earlier module's start is reused), the pack, and LoRA
    and transport folders of this module's own."""
    base = temporary_base()
    start_once(base)
    with own_model_folders(base, ("loras", "act")):
        yield SimpleNamespace(
            nodes=pack_nodes(),
            comfy=importlib.import_module("nodes"),  # ComfyUI's own nodes.py
            presets=importlib.import_module(f"{PACK}.nodes.presets"),
            export=importlib.import_module(f"{PACK}.nodes.export"),
            act=importlib.import_module(f"{PACK}.act"),
        )
    shutil.rmtree(base, ignore_errors=True)


def _random_transport(pack_act, module: nn.Module, sites: list[str], prefix: str):
    """Random Linear-AcT maps (support "all") on `sites` of `module`, named `prefix.site`."""
    maps = {}
    for i, site in enumerate(sites):
        layer = module.get_submodule(site)
        units = layer.out_features if isinstance(layer, nn.Linear) else layer.normalized_shape[-1]
        generator = torch.Generator().manual_seed(i)
        omega = 0.5 + torch.rand(units, generator=generator)
        beta = torch.rand(units, generator=generator) * 2 - 1
        infinite = torch.full((units,), float("inf"))
        maps[f"{prefix}.{site}"] = pack_act.ModuleMap(
            omega, beta, -infinite, infinite, -infinite, infinite
        )
    fingerprint = {
        f"{prefix}.{site}": {name: list(p.shape) for name, p in
                             module.get_submodule(site).named_parameters(recurse=False)}
        for site in sites
    }  # fmt: skip
    return pack_act.Transport(maps, "linear", "all", 16, 16, type(module).__name__, fingerprint)


@pytest.mark.parametrize("kind", FOLDING)
def test_every_site_of_the_comfyui_choice_folds(comfy, kind):
    model = tiny_model(kind)
    root = model.model.diffusion_model
    sites = comfy.presets.resolve_layers(root, comfy.presets.EXPORTABLE, "")
    assert sites
    if comfy.presets.is_flux(root):
        assert not any(s.startswith("single_blocks.") for s in sites)  # joint tokens
        assert {s.split(".", 2)[2] for s in sites} == {
            "img_attn.proj", "img_mlp.2", "txt_attn.proj", "txt_mlp.2"
        }  # fmt: skip
    transport = _random_transport(comfy.act, root, sites, "diffusion_model")
    weights = comfy.export.comfy_lora_weights(transport, model, None)
    assert not weights.left_out and len(weights.folded) == len(sites)


@pytest.mark.parametrize("kind", NOT_FOLDING)
def test_a_comfyui_model_without_foldable_modules_is_refused_with_its_class(comfy, kind):
    root = tiny_model(kind).model.diffusion_model
    with pytest.raises(comfy.act.ActError, match=rf"the {type(root).__name__} has no module"):
        comfy.presets.resolve_layers(root, comfy.presets.EXPORTABLE, "")


def test_the_comfyui_text_encoder_choice_is_clips_layer_norms(comfy):
    clip = tiny_clip()
    sites = comfy.presets.resolve_layers(clip.cond_stage_model, comfy.presets.EXPORTABLE, "")
    assert len(sites) == 5 and all("layer_norm" in s for s in sites)
    transport = _random_transport(comfy.act, clip.cond_stage_model, sites, "clip")
    weights = comfy.export.comfy_lora_weights(transport, None, clip)
    assert not weights.left_out and len(weights.folded) == 5


def _float32_clip():
    """The tiny CLIP in float32 (float16 would round the folded weights)."""
    import comfy.model_management

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_management, "text_encoder_dtype", lambda *_: torch.float32)
        return tiny_clip()


def _node_transport(comfy, model, clip, where: str, method: str):
    """Collect with the exportable choice, then Fit with its default support."""
    support = next(
        item.default
        for item in comfy.nodes["AcTFitTransport"].define_schema().inputs
        if item.id == "support"
    )
    assert support == "all"
    samples = comfy.nodes["AcTCollectActivations"].execute(
        model=model, clip=clip, source_prompts="\n".join(f"a photo of a {t}" for t in THINGS),
        target_prompts="\n".join(f"a watercolor painting of a {t}" for t in THINGS),
        where=where, layers=comfy.presets.EXPORTABLE, seed=0, width=64, height=64, steps=1,
        batch_size=4, causal=False, method=method, support=support, frames=1, cache="off",
    ).result[0]  # fmt: skip
    return (
        comfy.nodes["AcTFitTransport"]
        .execute(samples=samples, method=method, support=support)
        .result[0]
    )


def _comfy_latent(model, clip, size: int, cfg: float, **conditioning):
    positive = encode(clip, "a photo of a cat", **conditioning)
    negative = encode(clip, "", **conditioning)
    return sample(model, positive, negative, cfg=cfg, size=size)


@pytest.mark.parametrize(
    ("kind", "where", "method"),
    [("sd15", "both", "linear"), ("sd15", "both", "mean"), ("flux", "diffusion model", "linear")],
)
def test_the_nodes_export_an_exportable_transport_that_loraloader_applies_as_apply(
    comfy, kind, where, method
):
    model, clip = tiny_model(kind), _float32_clip()
    transport = _node_transport(comfy, model, clip, where, method)
    name = f"exportable {kind} {method}"
    text = comfy.nodes["AcTExportLoRA"].execute(
        transport=transport, model=model, clip=clip if where == "both" else None,
        filename=name, overwrite=False, allow_partial=False,
    ).ui.as_dict()["text"][0]  # fmt: skip
    assert "left out" not in text and f"{len(transport.sites)} modules" in text
    size, cfg, extra = (8, 1.0, {"guidance": 3.5}) if kind == "flux" else (16, 5.0, {})
    file = f"{name}.safetensors"
    if where == "both":
        loaded = comfy.comfy.LoraLoader().load_lora(model, clip, file, 1.0, 1.0)
    else:
        loaded = (comfy.comfy.LoraLoaderModelOnly().load_lora_model_only(model, file, 1.0)[0], clip)
    applied = comfy.nodes["AcTApply"].execute(
        transport=transport, model=model, clip=clip, strength_model=1.0, strength_clip=1.0,
        start_percent=0.0, end_percent=1.0, apply_to="both branches",
    ).result[:2]  # fmt: skip
    baked = comfy.nodes["AcTBake"].execute(transport=transport, strength=1.0, model=model,
                                           clip=clip).result[:2]  # fmt: skip
    plain = _comfy_latent(model, clip, size, cfg, **extra)
    steered = _comfy_latent(*applied, size, cfg, **extra)
    scale = steered.abs().max()
    for folded in (loaded, baked):
        assert (_comfy_latent(*folded, size, cfg, **extra) - steered).abs().max() <= (
            TOLERANCE * scale
        )
    assert (steered - plain).abs().max() > 100 * TOLERANCE * scale
