"""AcT Export LoRA in a real ComfyUI: the stock LoRA loaders apply the file as AcT Apply does.

Skipped unless COMFYUI_PATH names a ComfyUI checkout importable by this Python. Models and
text encoders are float32 on the CPU; sampled latents of the LoRA and of AcT Apply may differ
by at most 1e-5 of the latent's largest magnitude (a folded weight rounds differently from a
hooked output, nothing more; measured: up to 4e-6).
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
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

THINGS = ("cat", "dog", "house", "tree")
SOURCE = "\n".join(f"a photo of a {thing}" for thing in THINGS)
TARGET = "\n".join(f"a watercolor painting of a {thing}" for thing in THINGS)
TOLERANCE = 1e-5  # of the latent's largest magnitude
FLUX_LINEAR = r"double_blocks\.\d+\.(img_attn\.proj|img_mlp\.2|txt_mlp\.2)"


@pytest.fixture(scope="module")
def pack():
    """ComfyUI starts once per process, so an earlier module's start is reused; its base
    folder may be gone, so the LoRA and transport folders get a folder of their own."""
    base = temporary_base()
    start_once(base)
    with own_model_folders(base, ("loras", "act")):
        comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own nodes.py
        assert hasattr(comfy_nodes, "LoraLoader")
        errors = importlib.import_module(f"{PACK}.act.errors")  # the pack's own ActError
        yield SimpleNamespace(
            nodes=pack_nodes(), comfy=comfy_nodes, base=base, error=errors.ActError
        )
    shutil.rmtree(base, ignore_errors=True)


def _float32_clip():
    """The tiny CLIP in float32 (ComfyUI would choose float16 for it on this CPU, and a
    float16 weight rounds the fold to float16)."""
    import comfy.model_management

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_management, "text_encoder_dtype", lambda *_: torch.float32)
        clip = tiny_clip()
    assert {p.dtype for p in clip.cond_stage_model.parameters()} == {torch.float32}
    return clip


def _assert_same(latent, expected):
    assert (latent - expected).abs().max() <= TOLERANCE * expected.abs().max()


def _assert_steered(latent, plain):
    assert (latent - plain).abs().max() > 100 * TOLERANCE * plain.abs().max()


@pytest.fixture(scope="module")
def sd15(pack):
    return SimpleNamespace(model=tiny_model("sd15"), clip=_float32_clip())


def _transport(pack, model, clip, method="linear", support="all", **collect):
    arguments = dict(
        model=model, clip=clip, source_prompts=SOURCE, target_prompts=TARGET,
        where="both", layers="layer norms only", seed=0, width=64, height=64, steps=1,
        batch_size=4, causal=False, method=method, support=support, frames=1, cache="off",
    )  # fmt: skip
    arguments.update(collect)
    samples = pack.nodes["AcTCollectActivations"].execute(**arguments).result[0]
    fit = pack.nodes["AcTFitTransport"]
    return fit.execute(samples=samples, method=method, support=support).result[0]


def _export(pack, transport, name, model=None, clip=None, overwrite=False, allow_partial=False):
    output = pack.nodes["AcTExportLoRA"].execute(
        transport=transport, model=model, clip=clip, filename=name, overwrite=overwrite,
        allow_partial=allow_partial,
    )  # fmt: skip
    return output.ui.as_dict()["text"][0]


def _apply(pack, transport, model, clip, strength):
    return pack.nodes["AcTApply"].execute(
        transport=transport, model=model, clip=clip, strength_model=strength,
        strength_clip=strength, start_percent=0.0, end_percent=1.0, apply_to="both branches",
    ).result[:2]  # fmt: skip


def _loaded(pack, model, clip, name, strength):
    """ComfyUI's LoraLoader (both parts) or LoraLoaderModelOnly (no CLIP) at `strength`."""
    file = f"{name}.safetensors"
    if clip is None:
        return pack.comfy.LoraLoaderModelOnly().load_lora_model_only(model, file, strength)[0], None
    return pack.comfy.LoraLoader().load_lora(model, clip, file, strength, strength)


def _latent(model, clip, size=16, cfg=5.0, **conditioning):
    positive = encode(clip, "a photo of a cat", **conditioning)
    negative = encode(clip, "", **conditioning)
    return sample(model, positive, negative, cfg=cfg, size=size)


def _loras():
    import folder_paths

    return folder_paths.get_filename_list("loras")


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sd15_lora_loader_equals_apply_on_both_parts(pack, sd15, strength):
    transport = _transport(pack, sd15.model, sd15.clip)
    assert any(site.startswith("clip.") for site in transport.sites)
    text = _export(pack, transport, "sd15 style", sd15.model, sd15.clip, overwrite=True)
    assert "sd15 style.safetensors" in _loras() and "left out" not in text
    plain = _latent(sd15.model, sd15.clip)
    loaded = _latent(*_loaded(pack, sd15.model, sd15.clip, "sd15 style", strength))
    applied = _latent(*_apply(pack, transport, sd15.model, sd15.clip, strength))
    _assert_same(loaded, applied)
    _assert_steered(applied, plain)
    assert torch.equal(_latent(sd15.model, sd15.clip), plain)  # the inputs are untouched


def test_the_file_holds_comfyui_keys_that_its_loader_maps_entirely(pack, sd15):
    import comfy.lora
    import comfy.utils
    import folder_paths

    transport = _transport(pack, sd15.model, sd15.clip)
    _export(pack, transport, "keys", sd15.model, sd15.clip, overwrite=True)
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", "keys.safetensors"))
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3.diff" in lora
    assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff_b" in lora
    keys = comfy.lora.model_lora_keys_unet(sd15.model.model, {})
    keys = comfy.lora.model_lora_keys_clip(sd15.clip.cond_stage_model, keys)
    patches = comfy.lora.load_lora(lora, keys, log_missing=False)
    assert len(patches) == len(lora)  # every tensor becomes a weight patch
    assert "clip_l.transformer.text_model.final_layer_norm.bias" in patches


def test_mean_act_on_group_norms_folds_into_their_biases(pack, sd15):
    transport = _transport(pack, sd15.model, sd15.clip, method="mean", where="diffusion model",
                           layers="all norm layers")  # fmt: skip
    assert any(site.endswith("in_layers.0") for site in transport.sites)  # GroupNorms
    _export(pack, transport, "mean", sd15.model, overwrite=True)
    loaded, _ = _loaded(pack, sd15.model, None, "mean", 0.5)
    applied, _ = _apply(pack, transport, sd15.model, None, 0.5)
    _assert_same(_latent(loaded, sd15.clip), _latent(applied, sd15.clip))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_flux_lora_loader_model_only_equals_apply(pack, strength):
    flux, clip = tiny_model("flux"), _float32_clip()
    transport = _transport(pack, flux, clip, where="diffusion model", layers="custom regex",
                           layer_regex=FLUX_LINEAR)  # fmt: skip
    assert len(transport.sites) == 6
    _export(pack, transport, "flux style", flux, overwrite=True)
    guidance = {"guidance": 3.5}
    loaded, _ = _loaded(pack, flux, None, "flux style", strength)
    applied, _ = _apply(pack, transport, flux, None, strength)
    plain = _latent(flux, clip, size=8, cfg=1.0, **guidance)
    steered = _latent(applied, clip, size=8, cfg=1.0, **guidance)
    _assert_same(_latent(loaded, clip, size=8, cfg=1.0, **guidance), steered)
    _assert_steered(steered, plain)


def test_unfoldable_sites_are_refused_or_left_out_when_allowed(pack, sd15):
    transport = _transport(pack, sd15.model, sd15.clip, where="diffusion model",
                           layers="all norm layers")  # fmt: skip
    group_norm = "diffusion_model.input_blocks.3.0.in_layers.0"
    with pytest.raises(pack.error, match="allow_partial") as refused:
        _export(pack, transport, "partial", sd15.model)
    assert repr(group_norm) in str(refused.value) and "channel maps" in str(refused.value)
    assert "partial.safetensors" not in _loras()
    text = _export(pack, transport, "partial", sd15.model, allow_partial=True)
    assert "left out" in text and repr(group_norm) in text
    loaded, _ = _loaded(pack, sd15.model, None, "partial", 1.0)
    norms = [site for site in transport.sites if "transformer_blocks" in site]
    applied, _ = _apply(pack, transport.subset(norms), sd15.model, None, 1.0)
    _assert_same(_latent(loaded, sd15.clip), _latent(applied, sd15.clip))


def test_flux_single_blocks_are_left_out_with_the_reason(pack):
    flux, clip = tiny_model("flux"), tiny_clip()
    regex = rf"{FLUX_LINEAR}|single_blocks\.\d+\.linear2"
    transport = _transport(pack, flux, clip, where="diffusion model", layers="custom regex",
                           layer_regex=regex)  # fmt: skip
    with pytest.raises(pack.error, match="image tokens only"):
        _export(pack, transport, "flux partial", flux)
    text = _export(pack, transport, "flux partial", flux, allow_partial=True)
    assert "'diffusion_model.single_blocks.0.linear2'" in text


def test_bad_input_is_refused_and_nothing_is_written(pack, sd15):
    import folder_paths

    ranged = _transport(pack, sd15.model, sd15.clip, support="range")
    with pytest.raises(pack.error, match="support 'range'"):
        _export(pack, ranged, "ranged", sd15.model, sd15.clip)
    style = _transport(pack, sd15.model, sd15.clip)
    with pytest.raises(pack.error, match="connect the CLIP"):
        _export(pack, style, "no clip", sd15.model)
    with pytest.raises(pack.error, match=r"not found|shape"):
        _export(pack, style, "other model", tiny_model("flux"), sd15.clip)
    assert not {"ranged.safetensors", "no clip.safetensors", "other model.safetensors"} & set(
        _loras()
    )
    _export(pack, style, "twice", sd15.model, sd15.clip)
    path = folder_paths.get_full_path("loras", "twice.safetensors")
    before = Path(path).read_bytes()
    with pytest.raises(pack.error, match=r"twice\.safetensors.*exists"):
        _export(pack, _transport(pack, sd15.model, sd15.clip, method="mean"), "twice",
                sd15.model, sd15.clip)  # fmt: skip
    assert Path(path).read_bytes() == before
