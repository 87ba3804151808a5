"""The node pack in a real ComfyUI, in-process, with tiny models built from ComfyUI's classes.

Skipped unless COMFYUI_PATH names a ComfyUI checkout importable by this Python.
"""

from __future__ import annotations

import importlib
import shutil
from types import SimpleNamespace

import pytest
import torch
from comfy_support import (
    PACK,
    SIZES,
    TEXT_ENCODERS,
    TEXT_EXTRAS,
    encode,
    load_pack,
    sample,
    start_comfy,
    temporary_base,
    tiny_clip,
    tiny_model,
    tiny_text_encoder,
)

THINGS = ("cat", "dog", "house", "tree", "car", "boat")
SOURCE = "\n".join(f"a photo of a {thing}" for thing in THINGS)
TARGET = "\n".join(f"a watercolor painting of a {thing}" for thing in THINGS)


@pytest.fixture(scope="module")
def pack():
    base = temporary_base()
    start_comfy(base)
    load_pack()
    extension = importlib.import_module(f"{PACK}.nodes.extension")
    nodes = {node.define_schema().node_id: node for node in extension.NODES}
    yield SimpleNamespace(nodes=nodes, base=base)
    shutil.rmtree(base, ignore_errors=True)


def _collect_output(pack, model, clip, **overrides):
    """Collect Activations' output (samples and summary text), at the node's default pooling
    unless `pooling` is given. The collection cache is off: every call here collects, whatever
    an earlier test collected from equal inputs (tests/test_comfyui_ux.py tests the cache)."""
    arguments = dict(
        model=model,
        clip=clip,
        source_prompts=SOURCE,
        target_prompts=TARGET,
        where="diffusion model",
        layers="auto",
        seed=0,
        width=128,
        height=128,
        steps=1,
        batch_size=3,
        causal=False,
        method="linear",
        support="range",
        frames=1,
        cache="off",
    )
    arguments.update(overrides)
    return pack.nodes["AcTCollectActivations"].execute(**arguments)


def _collect(pack, model, clip, **overrides):
    return _collect_output(pack, model, clip, **overrides).result[0]


def _default(pack, node: str, name: str):
    """The default of a node's input, as the node's schema gives it to ComfyUI."""
    inputs = pack.nodes[node].define_schema().inputs
    return next(item for item in inputs if item.id == name).default


def _fit(pack, samples, method="linear", support="all"):
    return (
        pack.nodes["AcTFitTransport"]
        .execute(samples=samples, method=method, support=support)
        .result[0]
    )


def _apply(
    pack,
    transport,
    model=None,
    clip=None,
    strength=1.0,
    start=0.0,
    end=1.0,
    apply_to="both branches",
    strength_clip=None,
    **optional,
):
    """AcT Apply at `strength` on both parts unless `strength_clip` is given; both CFG
    branches unless told (as baked weights steer them)."""
    return _apply_output(
        pack, transport, model, clip, strength, start, end, apply_to, strength_clip, **optional
    ).result[:2]


def _apply_output(
    pack, transport, model=None, clip=None, strength=1.0, start=0.0, end=1.0,
    apply_to="both branches", strength_clip=None, **optional,
):  # fmt: skip
    return pack.nodes["AcTApply"].execute(
        transport=transport,
        model=model,
        clip=clip,
        strength_model=strength,
        strength_clip=strength if strength_clip is None else strength_clip,
        start_percent=start,
        end_percent=end,
        apply_to=apply_to,
        **optional,
    )


def _hooks_left(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def sd15(pack):
    model, clip = tiny_model("sd15"), tiny_clip()
    samples = _collect(pack, model, clip)
    transport = _fit(pack, samples)
    conds = encode(clip, "a photo of a cat"), encode(clip, "")
    return SimpleNamespace(
        model=model, clip=clip, samples=samples, transport=transport, conds=conds
    )


def test_collect_fit_apply_sample_and_strength_zero_is_bit_identical(pack, sd15):
    assert sd15.samples.source["diffusion_model.out.0"].shape == (6, 32)
    assert len(sd15.transport.maps) == len(sd15.samples.source) > 20
    plain = sample(sd15.model, *sd15.conds)
    (off, _) = _apply(pack, sd15.transport, model=sd15.model, strength=0.0)
    assert torch.equal(sample(off, *sd15.conds), plain)
    (on, _) = _apply(pack, sd15.transport, model=sd15.model, strength=1.0)
    steered = sample(on, *sd15.conds)
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert torch.equal(sample(sd15.model, *sd15.conds), plain)  # the input MODEL is untouched
    assert _hooks_left(sd15.model.model.diffusion_model) == 0
    assert not sd15.model.wrappers  # nothing was added to the input


def test_collection_pools_only_the_positive_rows_of_the_first_call(pack, sd15):
    with_cfg = _collect(pack, sd15.model, sd15.clip, batch_size=1)
    for site, values in sd15.samples.source.items():
        torch.testing.assert_close(with_cfg.source[site], values, rtol=1e-4, atol=1e-5)


def _first_denoising_call(patcher, conds) -> dict[int, torch.Tensor]:
    """The diffusion model's output in the first call of a cfg-5 sampling, by CFG branch
    (0: positive, 1: negative)."""
    calls = []

    def record(module, args, kwargs, output) -> None:
        kinds = kwargs["transformer_options"]["cond_or_uncond"]
        calls.append(dict(zip(kinds, output.detach().clone().chunk(len(kinds)), strict=True)))

    hook = patcher.model.diffusion_model.register_forward_hook(record, with_kwargs=True)
    try:
        sample(patcher, *conds, steps=1, cfg=5.0)
    finally:
        hook.remove()
    return calls[0]


def test_apply_steers_only_the_positive_branch_by_default(pack, sd15):
    default = _default(pack, "AcTApply", "apply_to")
    assert default == "positive only"
    plain = _first_denoising_call(sd15.model, sd15.conds)
    assert set(plain) == {0, 1}  # cfg 5 runs both branches
    (positive_only, _) = _apply(pack, sd15.transport, model=sd15.model, apply_to=default)
    moved = _first_denoising_call(positive_only, sd15.conds)
    assert torch.equal(moved[1], plain[1])  # the negative branch is left alone
    assert not torch.allclose(moved[0], plain[0], atol=1e-4)
    (both, _) = _apply(pack, sd15.transport, model=sd15.model, apply_to="both branches")
    assert not torch.allclose(_first_denoising_call(both, sd15.conds)[1], plain[1], atol=1e-4)


def test_a_window_outside_the_schedule_changes_nothing(pack, sd15):
    plain = sample(sd15.model, *sd15.conds)
    (late, _) = _apply(pack, sd15.transport, model=sd15.model, start=1.0, end=1.0)
    assert torch.equal(sample(late, *sd15.conds), plain)
    (early, _) = _apply(pack, sd15.transport, model=sd15.model, start=0.0, end=0.3)
    assert not torch.equal(sample(early, *sd15.conds), plain)


def test_two_chained_apply_nodes_both_steer(pack, sd15):
    other = _fit(pack, sd15.samples, method="mean", support="all")
    (first, _) = _apply(pack, sd15.transport, model=sd15.model, strength=0.5)
    (chained_off, _) = _apply(pack, other, model=first, strength=0.0)
    (chained, _) = _apply(pack, other, model=first, strength=1.0)
    once = sample(first, *sd15.conds)
    assert torch.equal(sample(chained_off, *sd15.conds), once)
    assert not torch.allclose(sample(chained, *sd15.conds), once, atol=1e-4)


def test_weight_patches_applied_before_apply_are_kept(pack, sd15):
    patched = sd15.model.clone()
    key = "diffusion_model.middle_block.1.norm.weight"
    assert patched.add_patches({key: ("diff", [torch.full((64,), 0.3)])}, 1.0, 1.0) == [key]
    lora = sample(patched, *sd15.conds)
    assert not torch.equal(lora, sample(sd15.model, *sd15.conds))
    (off, _) = _apply(pack, sd15.transport, model=patched, strength=0.0)
    assert torch.equal(sample(off, *sd15.conds), lora)
    (on, _) = _apply(pack, sd15.transport, model=patched, strength=1.0)
    (on_plain, _) = _apply(pack, sd15.transport, model=sd15.model, strength=1.0)
    assert not torch.allclose(sample(on, *sd15.conds), sample(on_plain, *sd15.conds), atol=1e-4)


def test_text_encoder_collect_and_steer_leave_the_input_clip_alone(pack, sd15):
    samples = _collect(pack, None, sd15.clip, where="text encoder", batch_size=4)
    assert all(site.startswith("clip.clip_l.") for site in samples.sites)
    transport = _fit(pack, samples)
    tokens = sd15.clip.tokenize("a photo of a cat")
    plain = sd15.clip.encode_from_tokens(tokens)
    (_, steered) = _apply(pack, transport, clip=sd15.clip, strength=1.0)
    assert not torch.allclose(steered.encode_from_tokens(tokens), plain, atol=1e-4)
    (_, off) = _apply(pack, transport, clip=sd15.clip, strength=0.0)
    assert torch.equal(off.encode_from_tokens(tokens), plain)
    assert torch.equal(sd15.clip.encode_from_tokens(tokens), plain)


def test_text_encoder_samples_pool_real_tokens_only(pack, sd15):
    site = "clip.clip_l.transformer.text_model.final_layer_norm"
    (output,) = _site_outputs(sd15.clip, site, "a cat")
    real = output[0, :4].float()  # start token, "a", "cat", end token
    short = dict(where="text encoder", source_prompts="a cat", target_prompts="a dog")
    tokens = _collect(pack, None, sd15.clip, pooling="tokens", **short)
    torch.testing.assert_close(tokens.source[site], real, rtol=1e-4, atol=1e-5)
    mean = _collect(pack, None, sd15.clip, pooling="mean", **short)
    expected = real.mean(dim=0, keepdim=True)
    torch.testing.assert_close(mean.source[site], expected, rtol=1e-4, atol=1e-5)


def _real_tokens(clip, prompt: str) -> int:
    """The prompt's tokens with start and end token, by the Hugging Face CLIP tokenizer."""
    return len(clip.tokenizer.clip_l.tokenizer(prompt)["input_ids"])


def test_per_token_samples_are_real_text_tokens_image_tokens_and_channel_means(pack, sd15):
    assert _default(pack, "AcTCollectActivations", "pooling") == "tokens"
    # 96 px: 12 x 12 latent tokens at the first level (more than 64), 6 x 6 at the second
    output = _collect_output(pack, sd15.model, sd15.clip, where="both", width=96, height=96)
    (samples,) = output.result
    prompts = SOURCE.splitlines()
    counts = {site: len(values) for site, values in samples.source.items()}
    text = sum(_real_tokens(sd15.clip, prompt) for prompt in prompts)
    assert counts["clip.clip_l.transformer.text_model.final_layer_norm"] == text
    assert text > 6 * len(prompts)  # "a photo of a cat": 7 tokens
    blocks = "diffusion_model.input_blocks"
    assert counts[f"{blocks}.1.1.transformer_blocks.0.norm1"] == len(prompts) * 64
    assert counts[f"{blocks}.3.1.transformer_blocks.0.norm1"] == len(prompts) * 36
    assert counts[f"{blocks}.1.0.in_layers.0"] == len(prompts)  # a ResNet GroupNorm
    assert counts[f"{blocks}.1.1.norm"] == len(prompts)  # the transformer's input GroupNorm
    assert "(per token)" in output.ui.as_dict()["text"][0]
    transport = _fit(pack, samples)
    assert transport.info["pooling"] == "tokens"
    assert set(transport.sites) == set(samples.sites)


def test_mean_pooling_of_both_parts_over_several_steps_fits(pack, sd15):
    samples = _collect(
        pack, sd15.model, sd15.clip, where="both", steps=2, pooling="mean", width=64, height=64
    )
    # the text encoder runs once per prompt, the denoiser once per prompt and step: each
    # text-encoder sample counts once per step
    assert {len(values) for values in samples.source.values()} == {2 * len(THINGS)}
    text = samples.source["clip.clip_l.transformer.text_model.final_layer_norm"]
    assert torch.equal(text[0], text[1]) and not torch.equal(text[1], text[2])
    assert _fit(pack, samples).info["pooling"] == "mean"


@pytest.mark.parametrize(
    ("kind", "site", "pixels"),
    [
        ("flux", "single_blocks.0", 64),  # [text; image], 4 x 4 image tokens
        ("flux", "single_blocks.0", 192),  # 12 x 12 image tokens: 64 of them, evenly spaced
        ("auraflow", "single_layers.0", 64),  # [registers; text; image]
    ],
)
def test_joint_blocks_give_per_token_samples_of_their_image_tokens_only(pack, kind, site, pixels):
    model, clip = tiny_model(kind), tiny_clip()
    image = (pixels // 8 // 2) ** 2  # latent pixels in 2 x 2 patches
    outputs = []

    def record(module, args, output) -> None:
        if output.shape[0] == 2:  # a batch of both prompts, not the dry run
            outputs.append(output.detach().clone())

    hook = model.model.diffusion_model.get_submodule(site).register_forward_hook(record)
    try:
        samples = _collect(
            pack,
            model,
            clip,
            source_prompts="a photo of a cat\na photo of a dog",
            target_prompts="a watercolor painting of a cat\na watercolor painting of a dog",
            batch_size=2,
            width=pixels,
            height=pixels,
            pooling="tokens",
        )
    finally:
        hook.remove()
    kept = min(image, 64)
    assert outputs[0].shape[1] > image  # the block holds text tokens too
    positions = torch.linspace(0, image - 1, kept).round().long()
    expected = outputs[0][:, -image:][:, positions].reshape(-1, outputs[0].shape[-1])
    torch.testing.assert_close(samples.source[f"diffusion_model.{site}"], expected)
    image_stream = "double_blocks.0:0" if kind == "flux" else "double_layers.0:1"
    assert len(samples.source[f"diffusion_model.{image_stream}"]) == 2 * kept


# kind -> (number of "auto" sites, what "auto" must leave out of ComfyUI's norm layers)
DIT_TEXT_ENCODERS = {
    "qwen_image": (5, "vision"),  # Qwen2.5-VL: 2 layers x 2 norms + final; `visual` has norms
    "hunyuan_image": (9, "vision"),  # Qwen2.5-VL, 4 layers (ComfyUI reads layer -3)
    "z_image": (7, "attention"),  # Qwen3, 3 layers: q_norm / k_norm in every attention
    "flux2_klein": (9, "attention"),  # Qwen3, 4 layers, padded to 512 tokens
    "lumina2": (13, None),  # Gemma2, 3 layers x 4 norms + final
    "flux": (10, None),  # CLIP-L (2 x 2 + final) and T5-XXL (2 x 2 + final)
}
# kinds whose tokenizer pads in ComfyUI; the others are padded to 64 tokens for the test
PADDED_BY_COMFYUI = ("flux2_klein", "flux")


def _left_out_norms(pack, clip, which: str | None) -> list[str]:
    """The text encoder's norm layers that "auto" must not pick: vision-tower or attention
    q/k norms."""
    presets = importlib.import_module(f"{PACK}.nodes.presets")
    selection = importlib.import_module(f"{PACK}.act.selection")
    pattern = {"vision": presets.VISION_TOWERS, "attention": presets.ATTENTION_NORMS}.get(which)
    names = selection.norm_sites(clip.cond_stage_model)
    return [name for name in names if pattern is not None and pattern.match(name)]


@pytest.mark.parametrize("kind", DIT_TEXT_ENCODERS)
def test_dit_text_encoders_collect_and_steer_leave_the_input_clip_alone(pack, kind):
    count, left_out = DIT_TEXT_ENCODERS[kind]
    clip = tiny_text_encoder(kind)
    patches = dict(clip.patcher.object_patches)  # ComfyUI's own (`manual_cast_dtype`)
    presets = importlib.import_module(f"{PACK}.nodes.presets")
    samples = _collect(pack, None, clip, where="text encoder", batch_size=4)
    sites = list(samples.sites)
    assert len(sites) == count and TEXT_ENCODERS[kind][1] in sites
    assert all(site.startswith("clip.") for site in sites)
    for site in sites:
        name = site.removeprefix("clip.")
        assert not presets.VISION_TOWERS.match(name) and not presets.ATTENTION_NORMS.match(name)
    if left_out is not None:  # the encoder has such norms, and none was picked
        assert _left_out_norms(pack, clip, left_out)
    transport = _fit(pack, samples)
    tokens = clip.tokenize("a photo of a cat")
    plain = clip.encode_from_tokens(tokens)
    (_, off) = _apply(pack, transport, clip=clip, strength=0.0)
    assert torch.equal(off.encode_from_tokens(tokens), plain)
    (_, steered) = _apply(pack, transport, clip=clip, strength=1.0)
    assert not torch.allclose(steered.encode_from_tokens(tokens), plain, atol=1e-4)
    assert torch.equal(clip.encode_from_tokens(tokens), plain)  # the input CLIP is untouched
    assert _hooks_left(clip.cond_stage_model) == 0
    assert clip.patcher.object_patches == patches


def _site_outputs(clip, site: str, text: str) -> list[torch.Tensor]:
    """Every output of a text-encoder site while `clip` encodes `text`."""
    outputs = []
    module = clip.cond_stage_model.get_submodule(site.removeprefix("clip."))
    handle = module.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
    try:
        clip.encode_from_tokens(clip.tokenize(text))
    finally:
        handle.remove()
    return outputs


@pytest.mark.parametrize("kind", DIT_TEXT_ENCODERS)
def test_dit_text_encoder_samples_pool_real_tokens_only(pack, kind):
    key, site = TEXT_ENCODERS[kind]
    unpadded = tiny_text_encoder(kind, min_length=1)
    padded = tiny_text_encoder(kind, min_length=None if kind in PADDED_BY_COMFYUI else 64)
    real = len(unpadded.tokenize("a cat")[key][0])
    assert len(padded.tokenize("a cat")[key][0]) > real  # padding follows the real tokens

    def pooled(clip, pooling: str) -> dict[str, torch.Tensor]:
        samples = _collect(
            pack,
            None,
            clip,
            where="text encoder",
            source_prompts="a cat",
            target_prompts="a dog",
            pooling=pooling,
        )
        return samples.source

    tokens = pooled(padded, "tokens")
    (output,) = _site_outputs(padded, site, "a cat")
    expected = output[0, :real].float()  # one sample per real token
    torch.testing.assert_close(tokens[site].float(), expected, rtol=1e-4, atol=1e-5)
    mean = pooled(padded, "mean")[site].float()
    torch.testing.assert_close(mean, expected.mean(dim=0, keepdim=True), rtol=1e-4, atol=1e-5)
    if kind == "flux":
        return  # T5 attends to its padding (Flux passes no attention mask): states differ
    # causal decoders: the real tokens' states, hence the samples, do not see the padding
    for name, values in pooled(unpadded, "tokens").items():
        torch.testing.assert_close(tokens[name].float(), values.float(), rtol=1e-3, atol=1e-4)


def test_causal_collection_from_the_graph(pack, sd15):
    samples = _collect(
        pack, sd15.model, sd15.clip, causal=True, support="all", layers="layer norms only"
    )
    # per token (the default): the 16 x 16 and 8 x 8 latent tokens, at most 64 a prompt
    assert {len(values) for values in samples.source.values()} == {6 * 64}
    transport = _fit(pack, samples, support="all")
    assert transport.causal and transport.info["pooling"] == "tokens"
    with pytest.raises(Exception, match="collected causally"):
        _fit(pack, samples, method="mean", support="all")


def test_save_and_load_round_trip_and_reload_on_change(pack, sd15):
    save = pack.nodes["AcTSaveTransport"]
    load = pack.nodes["AcTLoadTransport"]
    save.execute(transport=sd15.transport, filename="tiny style", overwrite=True)
    import folder_paths

    assert "tiny style.safetensors" in folder_paths.get_filename_list("act")
    loaded = load.execute(transport_name="tiny style.safetensors").result[0]
    assert loaded.sites == sd15.transport.sites
    assert torch.equal(
        loaded.maps[loaded.sites[0]].omega, sd15.transport.maps[loaded.sites[0]].omega
    )
    before = load.fingerprint_inputs(transport_name="tiny style.safetensors")
    save.execute(
        transport=_fit(pack, sd15.samples, method="mean"), filename="tiny style", overwrite=True
    )
    assert load.fingerprint_inputs(transport_name="tiny style.safetensors") != before
    save.execute(transport=sd15.transport, filename="tiny style", overwrite=False)
    assert "tiny style_2.safetensors" in folder_paths.get_filename_list("act")
    assert load.validate_inputs(transport_name="missing.safetensors") is not True


def test_a_transport_for_another_model_is_rejected(pack, sd15):
    flux = tiny_model("flux")
    with pytest.raises(Exception, match=r"not found|shape"):
        _apply(pack, sd15.transport, model=flux)
    wider = tiny_clip(hidden=48)
    text = _fit(pack, _collect(pack, None, sd15.clip, where="text encoder"))
    with pytest.raises(Exception, match=r"\(48,\).*\(32,\)"):
        _apply(pack, text, clip=wider)
    with pytest.raises(Exception, match="connect a MODEL"):
        _apply(pack, sd15.transport, clip=sd15.clip)


def test_interrupting_collection_leaves_the_model_clean(pack, sd15):
    import comfy.model_management as mm

    plain = sample(sd15.model, *sd15.conds)
    for causal in (False, True):
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                _collect(pack, sd15.model, sd15.clip, causal=causal)
        finally:  # a flag left set would interrupt every later test's sampling
            mm.interrupt_current_processing(False)
        assert _hooks_left(sd15.model.model.diffusion_model) == 0
        assert _hooks_left(sd15.clip.cond_stage_model) == 0
    assert torch.equal(sample(sd15.model, *sd15.conds), plain)


def test_bake_matches_apply_and_refuses_inexact_maps(pack, sd15):
    plain = sample(sd15.model, *sd15.conds)
    samples = _collect(pack, sd15.model, sd15.clip, layers="layer norms only")
    transport = _fit(pack, samples, support="all")
    bake = pack.nodes["AcTBake"]
    (baked, _) = bake.execute(transport=transport, model=sd15.model, clip=None, strength=0.7).result
    (hooked, _) = _apply(pack, transport, model=sd15.model, strength=0.7)
    torch.testing.assert_close(
        sample(baked, *sd15.conds), sample(hooked, *sd15.conds), rtol=1e-3, atol=1e-3
    )
    with pytest.raises(Exception, match=r"support 'range'|channel maps"):
        bake.execute(transport=sd15.transport, model=sd15.model, clip=None, strength=1.0)
    assert torch.equal(sample(sd15.model, *sd15.conds), plain)


def test_flux_blocks_collect_and_steer_image_tokens(pack):
    flux, clip = tiny_model("flux"), tiny_clip()
    samples = _collect(pack, flux, clip, batch_size=2)
    assert "diffusion_model.double_blocks.0:0" in samples.sites
    assert "diffusion_model.single_blocks.0" in samples.sites
    assert "diffusion_model.single_blocks.1" not in samples.sites  # only the first half
    transport = _fit(pack, samples)
    conds = encode(clip, "a photo of a cat", guidance=3.5), encode(clip, "", guidance=3.5)
    plain = sample(flux, *conds, cfg=1.0, size=8)
    (off, _) = _apply(pack, transport, model=flux, strength=0.0)
    assert torch.equal(sample(off, *conds, cfg=1.0, size=8), plain)
    (on, _) = _apply(pack, transport, model=flux, strength=1.0)
    assert not torch.allclose(sample(on, *conds, cfg=1.0, size=8), plain, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "sites"),
    [
        # SD3 skips the DIFFUSION_MODEL wrapper; both streams of every joint block, but the
        # last block updates no text stream (it returns None there)
        ("sd3", ["joint_blocks.0:0", "joint_blocks.0:1", "joint_blocks.1:1"]),
        # an SDXL-config UNet: every norm layer (its first level has no transformer)
        ("sdxl", None),
        (
            "flux_schnell",  # FLUX.1 without a guidance embedding
            [
                "double_blocks.0:0",
                "double_blocks.0:1",
                "double_blocks.1:0",
                "double_blocks.1:1",
                "single_blocks.0",
            ],
        ),
        ("z_image", ["layers.0", "layers.1"]),  # Lumina2's classes with Z-Image's modulation
        ("wan22_5b", ["blocks.0", "blocks.1"]),  # 48-channel video latents at /16
        ("wan", ["blocks.0", "blocks.1"]),  # a video DiT: one frame, (B, C, T, H, W) latents
        # Lumina2 / Z-Image: the main layers (not the refiners), never the fused q/k norms
        ("lumina2", ["layers.0", "layers.1"]),
        (
            "qwen_image",
            [
                "transformer_blocks.0:0",
                "transformer_blocks.0:1",
                "transformer_blocks.1:0",
                "transformer_blocks.1:1",
            ],
        ),
        # Chroma is FLUX-style: both streams of the doubles, the first half of the singles
        (
            "chroma",
            [
                "double_blocks.0:0",
                "double_blocks.0:1",
                "double_blocks.1:0",
                "double_blocks.1:1",
                "single_blocks.0",
            ],
        ),
        # FLUX.2: 128-channel latents at /16, FLUX-style sites
        (
            "flux2",
            [
                "double_blocks.0:0",
                "double_blocks.0:1",
                "double_blocks.1:0",
                "double_blocks.1:1",
                "single_blocks.0",
            ],
        ),
        # AuraFlow's single layers hold [registers; text; image]: only image tokens count
        (
            "auraflow",
            ["double_layers.0:0", "double_layers.0:1", "single_layers.0", "single_layers.1"],
        ),
        # PixArt-Sigma: its pos-embed needs latents over 32 x 32, so it runs at 40 and 48
        ("pixart_sigma", ["blocks.0", "blocks.1"]),
        # HunyuanDiT: CLIP and mT5 tokens (`TEXT_EXTRAS`), both with attention masks
        ("hydit", ["blocks.0", "blocks.1"]),
        # Stable Cascade stage C is neither a UNet nor a DiT: every norm layer, LayerNorm2d
        # over the channels of (B, C, H, W) maps, and the LayerNorm of its text tokens
        (
            "cascade_c",
            [
                "clip_norm",
                "embedding.2",
                "down_blocks.0.0.norm",
                "down_blocks.0.2.norm",
                "down_blocks.1.0.norm",
                "down_blocks.1.2.norm",
                "down_downscalers.1.0",
                "up_blocks.0.0.norm",
                "up_blocks.0.2.norm",
                "up_blocks.1.0.norm",
                "up_blocks.1.2.norm",
                "up_upscalers.0.0",
                "clf.0",
            ],
        ),
        # HunyuanImage 2.1 is FLUX-style: 64-channel latents at /32, no glyph (byT5) tokens
        (
            "hunyuan_image",
            [
                "double_blocks.0:0",
                "double_blocks.0:1",
                "double_blocks.1:0",
                "double_blocks.1:1",
                "single_blocks.0",
            ],
        ),
        # HiDream: Llama states (`TEXT_EXTRAS`); single stream blocks hold [image; text]
        (
            "hidream",
            [
                "double_stream_blocks.0:0",
                "double_stream_blocks.0:1",
                "single_stream_blocks.0",
                "single_stream_blocks.1",
            ],
        ),
    ],
)
def test_dits_collect_their_block_outputs_and_steer(pack, kind, sites):
    model, clip = tiny_model(kind), tiny_clip(extras=TEXT_EXTRAS.get(kind))
    pixels, (small, large) = SIZES.get(kind, (64, (8, 16)))
    samples = _collect(pack, model, clip, batch_size=2, width=pixels, height=pixels)
    if sites is None:  # a UNet: its GroupNorms and LayerNorms, transformer norms included
        root = model.model.diffusion_model
        norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
        names = [site.partition(".")[2] for site in samples.sites]
        assert all(isinstance(root.get_submodule(name), norms) for name in names)
        assert "input_blocks.3.1.transformer_blocks.0.norm1" in names
    else:
        assert samples.sites == [f"diffusion_model.{site}" for site in sites]
    transport = _fit(pack, samples, support="all")
    conds = encode(clip, "a photo of a cat"), encode(clip, "")
    plain = sample(model, *conds, size=small)
    (off, _) = _apply(pack, transport, model=model, strength=0.0)
    assert torch.equal(sample(off, *conds, size=small), plain)
    (on, _) = _apply(pack, transport, model=model, strength=1.0)
    assert not torch.allclose(sample(on, *conds, size=small), plain, atol=1e-4)
    assert not torch.allclose(sample(on, *conds, size=large), sample(model, *conds, size=large))
    assert torch.equal(sample(model, *conds, size=small), plain)  # the input MODEL is untouched
    assert _hooks_left(model.model.diffusion_model) == 0


@pytest.mark.parametrize(
    ("kind", "site", "after", "image_first"),
    [
        ("flux", "single_blocks.0", "single_blocks.1", False),  # [text; image], `img_slice`
        ("auraflow", "single_layers.0", "single_layers.1", False),  # [registers; text; image]
        ("lumina2", "layers.0", "layers.1", False),  # [caption; image]
        ("hidream", "single_stream_blocks.0", "single_stream_blocks.1", True),  # [image; text]
    ],
)
def test_joint_blocks_steer_image_tokens_and_leave_text_tokens_alone(
    pack, kind, site, after, image_first
):
    model, clip = tiny_model(kind), tiny_clip(extras=TEXT_EXTRAS.get(kind))
    samples = _collect(pack, model, clip, batch_size=2, width=64, height=64)
    transport = _fit(pack, samples, support="all").subset([f"diffusion_model.{site}"])
    conds = encode(clip, "a photo of a cat", guidance=3.5), encode(clip, "", guidance=3.5)
    root = model.model.diffusion_model

    def first_input_of_next_block(patcher) -> torch.Tensor:
        seen = []

        def record(module, args, kwargs) -> None:
            tokens = args[0] if args else kwargs["image_tokens"]  # HiDream passes keywords
            seen.append(tokens.clone())

        hook = root.get_submodule(after).register_forward_pre_hook(record, with_kwargs=True)
        try:
            sample(patcher, *conds, cfg=1.0, size=8, steps=1)
        finally:
            hook.remove()
        return seen[0]

    plain = first_input_of_next_block(model)
    (steered, _) = _apply(pack, transport, model=model, strength=1.0)
    moved = first_input_of_next_block(steered)
    count = 4 * 4  # an 8 x 8 latent in 2 x 2 patches
    image = slice(0, count) if image_first else slice(-count, None)
    text = slice(count, None) if image_first else slice(0, -count)
    assert plain.shape[1] > count
    assert torch.equal(moved[:, text], plain[:, text])
    assert not torch.allclose(moved[:, image], plain[:, image], atol=1e-4)


def test_collecting_modules_that_never_run_names_the_model_and_a_regex(pack, sd15):
    act = importlib.import_module(f"{PACK}.act")
    model = tiny_model("sd15", seed=1)
    model.model.diffusion_model.add_module("unused", torch.nn.LayerNorm(32))
    message = (
        r"1 of the modules that layers 'all norm layers' chose on the SD15 UNetModel never "
        r"ran \(e\.g\. 'diffusion_model\.unused'\).*custom regex.*'input_blocks\\\.\\d\+'"
    )
    with pytest.raises(act.ActError, match=message):
        _collect(pack, model, sd15.clip, layers="all norm layers")
    assert _hooks_left(model.model.diffusion_model) == 0


def test_video_collection_runs_the_frames_asked_for(pack):
    model, clip = tiny_model("wan"), tiny_clip()
    frames = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: frames.append(args[0].shape[2])
    )
    try:
        still = _collect(pack, model, clip, batch_size=2, width=64, height=64)
        video = _collect(pack, model, clip, batch_size=2, width=64, height=64, frames=9)
    finally:
        hook.remove()
    assert set(frames) == {1, 3}  # 9 frames are 3 latent frames (Wan compresses time by 4)
    assert still.sites == video.sites
    site = still.sites[0]  # per token: 4 x 4 latent tokens a frame, for each prompt
    assert (len(still.source[site]), len(video.source[site])) == (6 * 16, 6 * 48)


def test_steering_modules_that_never_run_is_an_error_not_a_silent_no_op(pack, sd15):
    act = importlib.import_module(f"{PACK}.act")
    model = tiny_model("sd15", seed=1)
    model.model.diffusion_model.add_module("unused", torch.nn.LayerNorm(32))
    samples = {"diffusion_model.unused": torch.randn(8, 32)}
    target = {"diffusion_model.unused": torch.randn(8, 32) + 1}
    transport = act.fit_transport(samples, target, support="all")
    (steered, _) = _apply(pack, transport, model=model, strength=1.0)
    message = r"none of the 1 modules the transport steers did \(e\.g\. 'unused'\)"
    with pytest.raises(act.ActError, match=message):
        sample(steered, *sd15.conds)
    assert _hooks_left(model.model.diffusion_model) == 0
    (off, _) = _apply(pack, transport, model=model, strength=0.0)
    sample(off, *sd15.conds)  # strength 0 steers nothing, so it has nothing to miss


def test_strength_sweep_renders_each_strength_from_the_same_noise(pack, sd15):
    latent = {"samples": torch.zeros([1, 4, 16, 16])}
    sweep = pack.nodes["AcTStrengthSweep"].execute(
        model=sd15.model,
        transport=sd15.transport,
        positive=sd15.conds[0],
        negative=sd15.conds[1],
        latent_image=latent,
        strengths="0, 0.5\n1",
        seed=0,
        steps=3,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
    )
    (result, labels) = sweep.result
    assert result["samples"].shape == (3, 4, 16, 16)
    assert labels.splitlines() == ["strength 0 (off)", "strength 0.5", "strength 1"]
    plain = sample(sd15.model, *sd15.conds)
    assert torch.equal(result["samples"][0:1], plain)
    (on, _) = _apply(pack, sd15.transport, model=sd15.model, strength=1.0)
    torch.testing.assert_close(result["samples"][2:3], sample(on, *sd15.conds))
    with pytest.raises(ValueError, match="strengths must be numbers"):
        pack.nodes["AcTStrengthSweep"].execute(
            model=sd15.model,
            transport=sd15.transport,
            positive=sd15.conds[0],
            negative=sd15.conds[1],
            latent_image=latent,
            strengths="0, strong",
            seed=0,
            steps=3,
            cfg=5.0,
            sampler_name="euler",
            scheduler="normal",
        )


def test_labelled_grid_tiles_images_under_their_labels(pack):
    images = torch.rand(5, 8, 10, 3)
    (grid,) = (
        pack.nodes["AcTLabelledGrid"].execute(images=images, labels="a\nb\nc", columns=3).result
    )
    label = importlib.import_module(f"{PACK}.nodes.sweep").LABEL_HEIGHT
    assert grid.shape == (1, 2 * (8 + label), 30, 3)
    expected = (images[4].numpy() * 255).round() / 255
    torch.testing.assert_close(grid[0, 8 + 2 * label :, 10:20], torch.from_numpy(expected))
    assert grid[0, :label].min() < 0.5  # the label text is drawn


def test_llm_node_steers_a_local_model_and_rejects_foreign_transports(pack):
    from pathlib import Path

    import folder_paths
    from text_models import save_tiny_llama

    folders = folder_paths.get_folder_paths("LLM")
    save_tiny_llama(Path(folders[0]) / "tiny-llama")
    save_tiny_llama(Path(folders[0]) / "wider-llama", hidden=48)
    node = pack.nodes["AcTLLMGenerate"]
    llm = importlib.import_module(f"{PACK}.nodes.llm")
    assert {"tiny-llama", "wider-llama"} <= set(llm.model_choices())

    def run(**overrides):
        arguments = dict(
            model="tiny-llama",
            prompt="The sea is",
            goal=llm.DETOXIFY,
            strength=1.0,
            max_new_tokens=8,
            seed=0,
            temperature=0.0,
            chat=False,
        )
        arguments.update(overrides)
        return node.execute(**arguments)

    (plain_text, transport) = run(strength=0.0).result
    act = importlib.import_module(f"{PACK}.act")
    model, tokenizer = act.load_causal_lm(llm.model_path("tiny-llama"))
    sampling = act.Sampling(max_new_tokens=8, repetition_penalty=1.2)
    continuation = act.generate(model, tokenizer, ["The sea is"], sampling)[0]
    assert plain_text == "The sea is" + continuation  # chat off: the prompt and its continuation
    assert transport.sites and all("self_attn.o_proj" in site for site in transport.sites)
    detox = act.text.goals.goal("detox")  # the node fits the library's measured default
    assert (detox.method, detox.support) == ("mean", "range")
    assert (transport.method, transport.support) == (detox.method, detox.support)
    output = run(strength=1.0)
    assert output.result[1] is transport  # fitted once, reused when only the strength changes
    assert output.result[0] != plain_text
    assert output.ui.as_dict()["text"] == (output.result[0],)
    concept = run(goal="concept: ocean (built-in sentences)").result[1]
    assert concept is not transport and (concept.method, concept.support) == ("linear", "all")
    with pytest.raises(ValueError, match="source_sentences is empty"):
        run(goal=llm.CUSTOM)
    with pytest.raises(Exception, match=r"shape"):
        run(model="wider-llama", transport=transport)


def test_strength_clip_zero_leaves_the_conditioning_alone_while_the_model_is_steered(pack, sd15):
    samples = _collect(pack, sd15.model, sd15.clip, where="both", batch_size=6)
    transport = _fit(pack, samples)
    assert transport.component("clip") is not None
    assert transport.component("diffusion_model") is not None
    tokens = sd15.clip.tokenize("a photo of a cat")
    plain = sd15.clip.encode_from_tokens(tokens)
    model, clip = _apply(pack, transport, sd15.model, sd15.clip, strength=1.0, strength_clip=0.0)
    assert torch.equal(clip.encode_from_tokens(tokens), plain)
    assert not torch.allclose(
        sample(model, *sd15.conds), sample(sd15.model, *sd15.conds), atol=1e-4
    )
    _, steered_clip = _apply(pack, transport, None, sd15.clip, strength_clip=1.0)
    assert not torch.allclose(steered_clip.encode_from_tokens(tokens), plain, atol=1e-4)


def test_a_model_sampling_node_after_apply_does_not_move_the_window(pack, sd15):
    """The window is converted to sigmas by the model_sampling in effect when sampling runs:
    Apply then ModelSamplingSD3 steers the same steps as ModelSamplingSD3 then Apply."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    def shifted(model):
        return ModelSamplingSD3().patch(model, shift=3.0)[0]

    steps, end = 6, 0.5
    original = sd15.model.get_model_object("model_sampling")
    final = shifted(sd15.model).get_model_object("model_sampling")
    schedule = comfy.samplers.calculate_sigmas(final, "normal", steps)[:-1]

    def steered_steps(sampling) -> list[int]:
        bound = sampling.percent_to_sigma(end)
        return [i for i, sigma in enumerate(schedule.tolist()) if sigma >= bound]

    # converted at Apply time (the original sampling), the window would hold other steps
    assert steered_steps(final) != steered_steps(original)
    (before, _) = _apply(pack, sd15.transport, model=shifted(sd15.model), end=end)
    (applied, _) = _apply(pack, sd15.transport, model=sd15.model, end=end)
    after = shifted(applied)
    expected = sample(before, *sd15.conds, steps=steps)
    assert torch.equal(sample(after, *sd15.conds, steps=steps), expected)
    (whole, _) = _apply(pack, sd15.transport, model=sd15.model, end=1.0)
    assert not torch.equal(sample(shifted(whole), *sd15.conds, steps=steps), expected)
    assert not torch.equal(sample(shifted(sd15.model), *sd15.conds, steps=steps), expected)


def _site_changes(patcher, sites: list[str], conds, **options) -> dict[str, tuple]:
    """Per diffusion-model site, in the first denoising call of a sampling: (the module's own
    output, the output after steering)."""
    import comfy.patcher_extension

    root = patcher.model.diffusion_model
    names = {site: site.removeprefix("diffusion_model.").rpartition(":") for site in sites}
    raw, final = {}, {}

    def recorder(store: dict, site: str):
        _, colon, index = names[site]

        def record(module, args, output) -> None:
            tensor = output[int(index)] if colon else output
            store.setdefault(site, tensor.detach().clone())

        return record

    def module_of(model, site):
        name, colon, index = names[site]
        return model.get_submodule(name if colon else index)

    handles = [module_of(root, site).register_forward_hook(recorder(raw, site)) for site in sites]

    def after_steering(executor, *args, **kwargs):  # runs inside AcT Apply's wrapper
        model = executor.class_obj.diffusion_model
        inner = [
            module_of(model, site).register_forward_hook(recorder(final, site)) for site in sites
        ]
        try:
            return executor(*args, **kwargs)
        finally:
            for handle in inner:
                handle.remove()

    recorded = patcher.clone()
    recorded.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", after_steering
    )
    try:
        sample(recorded, *conds, steps=1, **options)
    finally:
        for handle in handles:
            handle.remove()
    return {site: (raw[site], final[site]) for site in sites}


@pytest.fixture(scope="module")
def moved_sites(pack, sd15) -> list[str]:
    """The sites of the SD1.5 transport that steering changes (those before the first
    cross-attention see no prompt, so their maps are the identity)."""
    steered = _apply(pack, sd15.transport, model=sd15.model)[0]
    changes = _site_changes(steered, sd15.transport.sites, sd15.conds)
    return [site for site, (raw, moved) in changes.items() if not torch.equal(raw, moved)]


def test_a_zero_block_weight_leaves_its_group_alone(pack, sd15, moved_sites):
    steered = _apply(pack, sd15.transport, model=sd15.model, block_weights="1, 0, 0.5")[0]
    changes = _site_changes(steered, sd15.transport.sites, sd15.conds)
    groups = {"input_blocks": [], "middle_block": [], "output_blocks": []}
    for site in moved_sites:
        head = site.split(".")[1]
        groups["output_blocks" if head == "out" else head].append(site)
    assert all(groups.values())
    for site in sd15.transport.sites:
        if ".middle_block." in site:
            assert torch.equal(*changes[site]), site
    for site in groups["input_blocks"] + groups["output_blocks"]:
        assert not torch.equal(*changes[site]), site


def test_a_half_block_weight_is_half_the_strength(pack, sd15, moved_sites):
    site = next(site for site in moved_sites if ".input_blocks." in site)
    half = _apply(pack, sd15.transport, model=sd15.model, block_weights="0.5, 1, 1")[0]
    full = _apply(pack, sd15.transport, model=sd15.model, strength=0.5)[0]
    (raw, moved) = _site_changes(half, [site], sd15.conds)[site]
    (_, expected) = _site_changes(full, [site], sd15.conds)[site]
    assert torch.equal(moved, expected) and not torch.equal(raw, moved)


@pytest.mark.parametrize(
    ("text", "message"),
    [("1, 0.5", "2 values .* for 3 block groups .*input, middle, output"), ("1, x, 1", "'x'")],
)
def test_block_weights_that_do_not_fit_are_refused(pack, sd15, text, message):
    with pytest.raises(Exception, match=message):
        _apply(pack, sd15.transport, model=sd15.model, block_weights=text)


def _expected_weight(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The mask at a site's layout: channel maps (B, C, H, W), or square token grids."""
    import torch.nn.functional as F

    if tensor.ndim == 4:
        return F.interpolate(mask[:, None], size=tensor.shape[-2:], mode="area")
    side = int(tensor.shape[1] ** 0.5)
    assert side * side == tensor.shape[1]
    grid = F.interpolate(mask[:, None], size=(side, side), mode="area")
    return grid.flatten(2).transpose(1, 2)


def test_a_mask_steers_only_inside_it(pack, sd15, moved_sites):
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 4:30] = 1.0
    steered = _apply(pack, sd15.transport, model=sd15.model, mask=mask)[0]
    changes = _site_changes(steered, sd15.transport.sites, sd15.conds)
    assert len(moved_sites) > 10
    for site, (raw, moved) in changes.items():
        inside = (_expected_weight(mask, raw) > 0).expand_as(raw)
        assert inside.any() and not inside.all(), site
        assert torch.equal(raw[~inside], moved[~inside]), site
        assert torch.equal(raw[inside], moved[inside]) == (site not in moved_sites), site


def test_a_mask_on_a_flux_steers_image_tokens_inside_it_only(pack):
    flux, clip = tiny_model("flux"), tiny_clip()
    transport = _fit(pack, _collect(pack, flux, clip, batch_size=2))
    conds = encode(clip, "a photo of a cat", guidance=3.5), encode(clip, "", guidance=3.5)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :] = 1.0  # the upper half
    steered = _apply(pack, transport, model=flux, mask=mask)[0]
    changes = _site_changes(steered, transport.sites, conds, cfg=1.0, size=8)
    image = [site for site in transport.sites if site.endswith(":0")]
    assert image
    for site in image:  # 4 x 4 tokens of 2 x 2 patches: the first 8 are the upper half
        raw, moved = changes[site]
        assert torch.equal(raw[:, 8:], moved[:, 8:]) and not torch.equal(raw[:, :8], moved[:, :8])
    for site in transport.sites:
        if site.endswith(":1"):  # the text stream has no place in the picture: left alone
            assert torch.equal(*changes[site]), site


def test_a_mask_on_a_layer_of_unknown_layout_is_refused(pack, sd15):
    samples = _collect(
        pack, sd15.model, sd15.clip, layers="custom regex", layer_regex=r"time_embed\.2"
    )
    transport = _fit(pack, samples)
    steered = _apply(pack, transport, model=sd15.model, mask=torch.ones(1, 8, 8))[0]
    with pytest.raises(Exception, match=r"mask: cannot tell .*time_embed\.2"):
        sample(steered, *sd15.conds)


def test_apply_labels_the_strengths_it_used(pack, sd15):
    from dataclasses import replace

    transport = replace(sd15.transport, info={**sd15.transport.info, "description": "watercolor"})
    label = _apply_output(pack, transport, model=sd15.model, strength=0.5).result[2]
    assert label == "strength 0.5 (watercolor)"
    off = _apply_output(pack, transport, model=sd15.model, strength=0.0).result[2]
    assert off == "strength 0 (off)"
    weighted = _apply_output(pack, transport, model=sd15.model, block_weights="1 0 1")
    assert weighted.result[2] == "strength 1, blocks 1, 0, 1 (watercolor)"
    assert "input 1, middle 0, output 1" in weighted.ui.as_dict()["text"][0]


def test_block_weights_and_a_mask_without_a_steered_model_are_reported_ignored(pack, sd15):
    text = _fit(pack, _collect(pack, None, sd15.clip, where="text encoder"))
    output = _apply_output(
        pack, text, clip=sd15.clip, block_weights="1, 1, 1", mask=torch.ones(1, 8, 8)
    )
    assert "block_weights and mask ignored" in output.ui.as_dict()["text"][0]
    assert output.result[2] == "strength 1"
