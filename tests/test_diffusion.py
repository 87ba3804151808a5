"""Diffusers front end: collection from tiny SD, SDXL and FLUX pipelines, fitting, presets."""

import pytest
import torch
from diffusion_fixtures import (
    SOURCE,
    TARGET,
    call_kwargs,
    captured,
    flux_pipeline,
    options,
    sd_pipeline,
    sdxl_pipeline,
)

import act
from act import ActError, Transport
from act.diffusers.anatomy import StepClock
from act.diffusers.batches import real_tokens
from act.diffusers.collection import collect_pipeline, fit_pipeline

GROUP_NORM = "unet.mid_block.resnets.1.norm1"  # after cross-attention: (B, C, H, W)
LAYER_NORM = "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm3"  # (B, HW, C)


@pytest.fixture(scope="module")
def sd():
    return sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_pipeline()


@pytest.fixture(scope="module")
def flux():
    return flux_pipeline()


def test_collection_pools_the_conditional_half_of_the_first_denoiser_call(sd):
    unet_calls = []
    handle = sd.unet.register_forward_hook(lambda m, a, o: unet_calls.append(1))
    try:
        samples = collect_pipeline(
            sd,
            SOURCE,
            TARGET,
            layers=[GROUP_NORM, LAYER_NORM],
            batch_size=2,
            pooling="mean",
            **options(sd, num_inference_steps=4),
        )
    finally:
        handle.remove()
    assert len(unet_calls) == 3  # one call per batch (2 source + 1 target), not 4 steps
    assert samples.sites == [GROUP_NORM, LAYER_NORM]
    assert samples.source[GROUP_NORM].shape == (3, 64)
    assert samples.target[GROUP_NORM].shape == (2, 64)
    unet = sd.unet
    group_norm = unet.get_submodule(GROUP_NORM[len("unet.") :])
    layer_norm = unet.get_submodule(LAYER_NORM[len("unet.") :])
    for prompts, seed, rows in ((SOURCE[:2], 0, slice(0, 2)), (SOURCE[2:], 1, slice(2, 3))):
        with captured(group_norm) as maps, captured(layer_norm) as tokens, torch.no_grad():
            sd(**call_kwargs(sd, prompt=prompts, seed=seed, num_inference_steps=4))
        n = len(prompts)
        assert maps[0].shape[0] == 2 * n  # classifier-free guidance: [uncond; cond]
        expected = maps[0][n:].mean(dim=(2, 3))
        torch.testing.assert_close(samples.source[GROUP_NORM][rows], expected)
        torch.testing.assert_close(samples.source[LAYER_NORM][rows], tokens[0][n:].mean(dim=1))
        assert not torch.allclose(samples.source[GROUP_NORM][rows], maps[0][:n].mean(dim=(2, 3)))
    assert samples.model_class == "StableDiffusionPipeline"
    assert samples.info["pipeline"]["components"]["unet"]["class"] == "UNet2DConditionModel"


def test_at_steps_records_later_denoising_steps(sd):
    module = sd.unet.get_submodule(GROUP_NORM[len("unet.") :])
    with captured(module) as maps, torch.no_grad():
        sd(**call_kwargs(sd, prompt=SOURCE[:1], num_inference_steps=3))
    samples = collect_pipeline(
        sd,
        SOURCE[:1],
        TARGET[:1],
        layers=[GROUP_NORM],
        at_steps=(0, 2),
        **options(sd, num_inference_steps=3),
    )
    expected = torch.cat([maps[0][1:], maps[2][1:]]).mean(dim=(2, 3))
    torch.testing.assert_close(samples.source[GROUP_NORM], expected)
    with pytest.raises(ActError, match=r"step\(s\) \[5\] never ran"):
        collect_pipeline(sd, SOURCE, TARGET, layers=[GROUP_NORM], at_steps=(5,), **options(sd))


def test_several_steps_with_text_encoders_fit_one_sample_per_prompt_and_step(sd):
    layers = [GROUP_NORM, "text_encoder.final_layer_norm"]
    kwargs = dict(
        where="both",
        layers=layers,
        support="all",
        pooling="mean",
        **options(sd, num_inference_steps=3),
    )
    one_step = fit_pipeline(sd, SOURCE, TARGET, **kwargs)
    samples = collect_pipeline(sd, SOURCE, TARGET, at_steps=(0, 2), **kwargs)
    assert [len(samples.source[site]) for site in layers] == [2 * len(SOURCE)] * 2
    assert [len(samples.target[site]) for site in layers] == [2 * len(TARGET)] * 2
    two_steps = samples.fit("linear", "all")
    encoder = one_step.maps[layers[1]]
    torch.testing.assert_close(two_steps.maps[layers[1]].omega, encoder.omega)
    torch.testing.assert_close(two_steps.maps[layers[1]].beta, encoder.beta)
    assert not torch.equal(two_steps.maps[GROUP_NORM].beta, one_step.maps[GROUP_NORM].beta)


def test_text_encoders_pool_real_tokens_of_the_positive_prompt_only(sdxl):
    calls = {"unet": 0, "text_encoder": 0, "text_encoder_2": 0}
    handles = [
        getattr(sdxl, name).register_forward_hook(
            lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    try:
        samples = collect_pipeline(
            sdxl,
            SOURCE,
            TARGET,
            where="text_encoder",
            batch_size=2,
            pooling="mean",
            **options(sdxl, negative_prompt="blurry"),
        )
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"unet": 0, "text_encoder": 3, "text_encoder_2": 3}  # no negative encoding
    assert {site.split(".")[0] for site in samples.sites} == {"text_encoder", "text_encoder_2"}
    site = "text_encoder_2.text_model.final_layer_norm"
    ids = sdxl.tokenizer_2(SOURCE, padding="max_length", max_length=77, return_tensors="pt")
    assert int(ids.input_ids[0, -1]) == 0 != sdxl.tokenizer_2.eos_token_id  # pads with "!"
    with captured(sdxl.text_encoder_2.text_model.final_layer_norm) as outputs, torch.no_grad():
        sdxl.text_encoder_2(ids.input_ids)
    mask = real_tokens(ids.input_ids, sdxl.tokenizer_2.eos_token_id)
    assert mask.sum(dim=1).tolist() == ids.attention_mask.sum(dim=1).tolist()
    expected = torch.stack([out[m].mean(dim=0) for out, m in zip(outputs[0], mask, strict=True)])
    torch.testing.assert_close(samples.source[site], expected)


def test_per_token_collection_keeps_each_real_token_and_image_position(sd):
    encoder = "text_encoder.final_layer_norm"
    layers = [GROUP_NORM, LAYER_NORM, encoder]
    kwargs = dict(where="both", layers=layers, batch_size=2, **options(sd, num_inference_steps=3))
    tokens = collect_pipeline(sd, SOURCE, TARGET, max_tokens=16, **kwargs)  # the default
    means = collect_pipeline(sd, SOURCE, TARGET, pooling="mean", **kwargs)
    ids = sd.tokenizer(SOURCE, padding="max_length", max_length=77, return_tensors="pt")
    real = real_tokens(ids.input_ids, sd.tokenizer.eos_token_id)
    assert int(real.sum(1).max()) <= 16  # every prompt's real tokens are kept
    assert len(tokens.source[encoder]) == int(real.sum()) > 2 * len(SOURCE)
    assert tokens.source[GROUP_NORM].shape == means.source[GROUP_NORM].shape  # channel means
    torch.testing.assert_close(tokens.source[GROUP_NORM], means.source[GROUP_NORM])
    assert len(tokens.source[LAYER_NORM]) == 16 * len(SOURCE)  # 64 positions, 16 kept each
    first = int(real[0].sum())  # the first prompt's tokens average to its pooled sample
    torch.testing.assert_close(
        tokens.source[encoder][:first].mean(0), means.source[encoder][0], rtol=1e-5, atol=1e-5
    )
    transport = tokens.fit("linear", "range")
    assert transport.info["pooling"] == "tokens" and transport.info["max_tokens"] == 16
    torch.testing.assert_close(
        transport.maps[encoder].source_hi, tokens.source[encoder].max(0).values
    )
    two_steps = collect_pipeline(
        sd, SOURCE, TARGET, pooling="tokens", at_steps=(0, 2), max_tokens=16, **kwargs
    )
    assert len(two_steps.source[LAYER_NORM]) == 2 * 16 * len(SOURCE)
    assert len(two_steps.source[encoder]) == int(real.sum())  # recorded once, not repeated


def test_real_tokens_end_at_the_first_end_of_text_token():
    ids = torch.tensor([[5, 7, 9, 2, 2, 2], [5, 2, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    assert real_tokens(ids, 2).int().tolist() == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]


def test_flux_presets_and_true_cfg_record_the_positive_call(flux):
    transport = fit_pipeline(flux, SOURCE, TARGET, **options(flux))
    double = [f"transformer.transformer_blocks.{i}:{s}" for i in (0, 1) for s in (0, 1)]
    single = [
        "transformer.single_transformer_blocks.0:0",
        "transformer.single_transformer_blocks.0:1",
    ]
    assert transport.sites == double + single
    plain = collect_pipeline(flux, SOURCE, TARGET, where="both", **options(flux))
    true_cfg = collect_pipeline(
        flux,
        SOURCE,
        TARGET,
        where="both",
        **options(flux, negative_prompt="blurry", true_cfg_scale=2.0),
    )
    assert {s.split(".")[0] for s in plain.sites} == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
    }
    assert flux._current_timestep is None  # as a full call leaves it
    for site in plain.sites:
        assert torch.equal(plain.source[site], true_cfg.source[site]), site


def test_presets_defaults_and_regular_expressions(sd, sdxl):
    transport = fit_pipeline(sd, SOURCE, TARGET, support="all", **options(sd))
    assert len(transport.sites) == 33 and all(s.startswith("unet.") for s in transport.sites)
    assert transport.model_class == "StableDiffusionPipeline" and transport.support == "all"
    both = fit_pipeline(sdxl, SOURCE, TARGET, where="both", **options(sdxl))
    prefixes = {site.split(".")[0] for site in both.sites}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"} and len(both.sites) == 45 + 10
    picked = collect_pipeline(
        sd, SOURCE, TARGET, layers=r"unet\.mid_block\..*norm\d", **options(sd)
    )
    assert picked.sites and all(s.startswith("unet.mid_block.") for s in picked.sites)
    with pytest.raises(ActError, match="matches no module"):
        collect_pipeline(sd, SOURCE, TARGET, layers=r"mid_block\..*", **options(sd))


@pytest.mark.parametrize("live", [None, 1])
def test_causal_collection_fits_each_module_after_the_previous_maps(sd, live):
    layers = [r"unet\.down_blocks\.0\.resnets\.0\.norm[12]", "text_encoder.final_layer_norm"]
    kwargs = {"where": "both", "layers": layers, **options(sd, negative_prompt="blurry")}
    causal = fit_pipeline(sd, SOURCE, TARGET, causal=True, max_live_batches=live, **kwargs)
    plain = fit_pipeline(sd, SOURCE, TARGET, **kwargs)
    encoder, first, second = plain.sites[2], plain.sites[0], plain.sites[1]
    assert causal.causal and causal.sites == [encoder, first, second]  # in execution order
    assert causal.model_class == "StableDiffusionPipeline"
    for site in (encoder, first):  # nothing steered runs before them
        torch.testing.assert_close(causal.maps[site].omega, plain.maps[site].omega)
    assert not torch.allclose(causal.maps[second].omega, plain.maps[second].omega)
    with pytest.raises(ActError, match="one denoising step"):
        collect_pipeline(sd, SOURCE, TARGET, causal=True, at_steps=(0, 1), **options(sd))


def test_transport_files_round_trip_with_the_pipeline_fingerprint(sd, tmp_path):
    transport = fit_pipeline(sd, SOURCE, TARGET, where="both", **options(sd))
    transport.save(tmp_path / "style.safetensors")
    loaded = Transport.load(tmp_path / "style.safetensors")
    assert loaded.sites == transport.sites and loaded.model_class == "StableDiffusionPipeline"
    assert loaded.info == transport.info
    assert loaded.info["source_prompts"] == SOURCE
    assert loaded.info["pipeline"]["components"]["text_encoder"]["config"]["hidden_size"] == 32
    for site in transport.sites:
        assert torch.equal(loaded.maps[site].omega, transport.maps[site].omega)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_prompts": []}, "source_prompts is empty"),
        ({"target_prompts": "a cat"}, "single string 'a cat'"),
        ({"target_prompts": ["a cat", 3]}, r"target_prompts\[1\] is int"),
        ({"where": "vae"}, "unknown where='vae'"),
        ({"where": "transformer"}, "has no 'transformer' component; its denoiser is 'unet'"),
        ({"generator": None}, "sets generator itself"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"at_steps": (-1,)}, "non-negative step indices"),
    ],
)
def test_bad_arguments_are_named(sd, kwargs, message):
    arguments = {"source_prompts": SOURCE, "target_prompts": TARGET, **options(sd), **kwargs}
    with pytest.raises(ActError, match=message):
        collect_pipeline(sd, **arguments)


def test_step_clock_finds_sd_and_flux_timesteps():
    class Scheduler:
        timesteps = torch.tensor([1000.0, 750.0, 750.0, 250.0])

    class Pipe:
        scheduler = Scheduler()

    clock = StepClock(Pipe())
    seen = []
    for t in (1000.0, 750.0, 750.0, 250.0, 3.0):
        clock.update((None, torch.tensor(t)), {})
        seen.append((clock.index, clock.call))
    assert seen == [(0, 0), (1, 0), (1, 1), (3, 0), (None, 0)]
    clock.update((), {"timestep": torch.tensor([0.25, 0.25])})  # FLUX passes t / 1000
    assert (clock.index, clock.fraction) == (3, 0.75)


def test_end_to_end_fit_trains_the_maps_through_the_pipeline_and_leaves_it_alone(sd):
    layers = [r"unet\.down_blocks\.0\.resnets\.0\.norm[12]", r"unet\.mid_block\.resnets\.0\.norm1"]
    kwargs = {"layers": layers, "support": "all", **options(sd)}
    weights = {name: value.clone() for name, value in sd.unet.state_dict().items()}
    flags = {name: p.requires_grad for name, p in sd.unet.named_parameters()}
    losses = []
    transport = fit_pipeline(
        sd, SOURCE, TARGET, method="end-to-end", steps=8, learning_rate=0.05,
        **{**kwargs, "progress": lambda step, steps, loss: losses.append(loss)},
    )  # fmt: skip
    assert transport.method == "end-to-end" and transport.model_class == "StableDiffusionPipeline"
    assert len(losses) == 8
    loss = transport.info["end-to-end"]["loss"]
    assert loss["fitted"] < loss["plain"]
    assert any(not torch.equal(m.omega, torch.ones_like(m.omega)) for m in transport.maps.values())
    assert all(torch.equal(v, weights[k]) for k, v in sd.unet.state_dict().items())
    assert {name: p.requires_grad for name, p in sd.unet.named_parameters()} == flags
    plain = sd(**call_kwargs(sd)).images
    with act.steer(sd, transport, strength=0.0):
        assert torch.equal(sd(**call_kwargs(sd)).images, plain)
    with act.steer(sd, transport, strength=1.0):
        assert not torch.equal(sd(**call_kwargs(sd)).images, plain)


def test_end_to_end_options_are_named_where_they_do_not_apply(sd):
    with pytest.raises(ActError, match="steps: options of method 'end-to-end'"):
        fit_pipeline(sd, SOURCE, TARGET, steps=3, **options(sd))
    with pytest.raises(ActError, match="causal: method 'end-to-end'"):
        fit_pipeline(sd, SOURCE, TARGET, method="end-to-end", causal=True, **options(sd))
    with pytest.raises(ActError, match="use fit_pipeline"):
        collect_pipeline(sd, SOURCE, TARGET, method="end-to-end", **options(sd))


def test_end_to_end_fit_runs_through_a_flux_transformer(flux):
    transport = fit_pipeline(
        flux, SOURCE, TARGET, method="end-to-end", steps=4, support="all", **options(flux)
    )
    loss = transport.info["end-to-end"]["loss"]
    assert transport.sites and all(site.startswith("transformer.") for site in transport.sites)
    assert loss["fitted"] < loss["plain"]
