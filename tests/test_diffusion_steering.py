"""Steering tiny SD, SDXL and FLUX pipelines: identities, step ranges, cond_only, mismatches."""

from dataclasses import replace

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
from act import ActError, ModelMismatchError, Transport
from act.diffusers.collection import collect_pipeline, fit_pipeline
from act.diffusers.steering import PipelineSteering, steer_pipeline
from act.fitting import fit_transport

BUILDERS = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "flux": flux_pipeline}


@pytest.fixture(scope="module")
def fitted():
    """Each tiny pipeline, a transport on its denoiser and text encoders, one on its denoiser."""
    pipes = {}
    target = [f"{p}, watercolor, highly detailed" for p in TARGET + SOURCE]
    for name, build in BUILDERS.items():
        pipe = build()
        both = fit_pipeline(pipe, SOURCE, target, where="both", **options(pipe))
        pipes[name] = pipe, both, fit_pipeline(pipe, SOURCE, target, **options(pipe))
    return pipes


def images(pipe, **extra):
    with torch.no_grad():
        return pipe(**call_kwargs(pipe, **extra)).images


def hooks(pipe):
    """Ids of every hook on the pipeline's modules (transformers adds its own on first use)."""
    modules = [
        m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
    ]
    return {key for m in modules for key in [*m._forward_hooks, *m._forward_pre_hooks]}


@pytest.mark.parametrize("name", BUILDERS)
def test_strength_zero_is_bit_identical_and_the_context_restores_the_pipeline(fitted, name):
    pipe, transport, _ = fitted[name]
    plain, before = images(pipe), hooks(pipe)
    with act.steer(pipe, transport, strength=0.0) as steering:
        assert isinstance(steering, PipelineSteering)
        assert torch.equal(images(pipe), plain)
        steering.strength = 1.0
        steered = images(pipe)
        steering.strength = 0.5
        half = images(pipe)
    assert not torch.equal(steered, plain) and not torch.equal(half, steered)
    assert (half - plain).abs().mean() < (steered - plain).abs().mean()
    assert torch.equal(images(pipe), plain) and hooks(pipe) == before
    assert not steering.attached


def test_hooks_are_removed_when_the_body_raises(fitted):
    pipe, transport, _ = fitted["sd"]
    before = hooks(pipe)
    with pytest.raises(RuntimeError, match="stop"), steer_pipeline(pipe, transport):
        raise RuntimeError("stop")
    assert hooks(pipe) == before


@pytest.mark.parametrize("name", BUILDERS)
def test_a_step_range_outside_the_schedule_changes_nothing(fitted, name):
    pipe, _, transport = fitted[name]
    plain = images(pipe)
    with steer_pipeline(pipe, transport, steps=(0.75, 1.0)):
        assert torch.equal(images(pipe), plain)  # 2 steps: at 0 and 0.5
    with steer_pipeline(pipe, transport, steps=(0.5, 1.0)):
        assert not torch.equal(images(pipe), plain)


@pytest.mark.parametrize("name", BUILDERS)
def test_a_step_range_steers_only_the_steps_inside_it(fitted, name):
    pipe, _, transport = fitted[name]
    denoiser = pipe.unet if name != "flux" else pipe.transformer
    with captured(denoiser) as plain:
        images(pipe, num_inference_steps=4)
    with steer_pipeline(pipe, transport, steps=(0.5, 1.0)), captured(denoiser) as steered:
        images(pipe, num_inference_steps=4)
    assert [torch.equal(a, b) for a, b in zip(plain, steered, strict=True)] == [1, 1, 0, 0]


def test_by_default_the_unconditional_prediction_is_left_untouched(fitted):
    for name in ("sd", "sdxl"):
        pipe, transport, _ = fitted[name]  # denoiser and text encoders
        with captured(pipe.unet) as plain:
            images(pipe, negative_prompt="blurry")
        with steer_pipeline(pipe, transport), captured(pipe.unet) as steered:
            images(pipe, negative_prompt="blurry")
        assert torch.equal(plain[0][:1], steered[0][:1]), name  # [uncond; cond], step 0
        assert not torch.allclose(plain[0][1:], steered[0][1:]), name
        with (
            steer_pipeline(pipe, transport, cond_only=False),
            captured(pipe.unet) as everywhere,
        ):
            images(pipe, negative_prompt="blurry")
        assert not torch.allclose(plain[0][:1], everywhere[0][:1]), name


def test_without_guidance_the_default_steers_every_call(fitted):
    pipe, transport, _ = fitted["sd"]
    with steer_pipeline(pipe, transport, cond_only=False):
        both = images(pipe, guidance_scale=1.0)
    with steer_pipeline(pipe, transport):
        assert torch.equal(images(pipe, guidance_scale=1.0), both)
    flux, transport, _ = fitted["flux"]
    with steer_pipeline(flux, transport, cond_only=False):
        both = images(flux)
    with steer_pipeline(flux, transport):
        assert torch.equal(images(flux), both)
    generator = torch.Generator().manual_seed(0)
    call = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "timestep": torch.tensor([0.123]),  # not in the schedule: outside the sampling loop
        "guidance": torch.tensor([3.5]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "txt_ids": torch.zeros(8, 3),
        "img_ids": torch.zeros(16, 3),
    }
    with torch.no_grad():
        plain = flux.transformer(**call).sample
        with steer_pipeline(flux, transport):
            outside = flux.transformer(**call).sample  # steered, not refused
    assert not torch.allclose(outside, plain)


def test_cond_only_on_flux_true_cfg_leaves_the_negative_call_untouched(fitted):
    pipe, transport, _ = fitted["flux"]
    true_cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    with captured(pipe.transformer) as plain:
        images(pipe, **true_cfg)
    with steer_pipeline(pipe, transport, cond_only=True), captured(pipe.transformer) as steered:
        images(pipe, **true_cfg)
    assert len(plain) == 4  # 2 steps x (positive, negative)
    assert torch.equal(plain[1], steered[1]) and not torch.allclose(plain[0], steered[0])


def test_a_loaded_transport_steers_exactly_like_the_fitted_one(fitted, tmp_path):
    pipe, transport, _ = fitted["sdxl"]
    transport.save(tmp_path / "style.safetensors")
    loaded = Transport.load(tmp_path / "style.safetensors")
    with steer_pipeline(pipe, transport):
        expected = images(pipe)
    with steer_pipeline(pipe, loaded):
        assert torch.equal(images(pipe), expected)


def test_another_architecture_is_refused_with_a_clear_message(fitted):
    sd, sd_transport, _ = fitted["sd"]
    sdxl, sdxl_transport, _ = fitted["sdxl"]
    flux = fitted["flux"][0]
    before = [hooks(pipe) for pipe in (sd, sdxl, flux)]
    with pytest.raises(ModelMismatchError, match="FluxPipeline has no 'unet' component"):
        steer_pipeline(flux, sd_transport)
    with pytest.raises(
        ModelMismatchError, match=r"unet.config.\w+ is .* in this StableDiffusionPipeline"
    ):
        steer_pipeline(sd, sdxl_transport)
    bare = fit_transport({"x": torch.randn(4, 3)}, {"x": torch.randn(4, 3)})
    with pytest.raises(ModelMismatchError, match="not on a diffusers pipeline"):
        steer_pipeline(sd, bare)
    assert [hooks(pipe) for pipe in (sd, sdxl, flux)] == before


def test_damaged_pipeline_transports_are_refused_with_a_clear_message(fitted):
    sd, transport, _ = fitted["sd"]
    before = hooks(sd)
    pipeline = transport.info["pipeline"]
    broken = replace(transport, info={"pipeline": {**pipeline, "components": {"unet": [1]}}})
    with pytest.raises(ModelMismatchError, match=r"components\['unet'\] is not an object"):
        steer_pipeline(sd, broken)
    site = transport.sites[0]
    unprefixed = replace(transport, maps={"norm": transport.maps[site]}, module_params={})
    with pytest.raises(ModelMismatchError, match="site 'norm' names no pipeline component"):
        steer_pipeline(sd, unprefixed)
    assert hooks(sd) == before


@pytest.mark.parametrize("steps", [(0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.5,), "early"])
def test_bad_step_ranges_are_named(fitted, steps):
    pipe, _, transport = fitted["sd"]
    with pytest.raises(ActError, match="steps must be"):
        steer_pipeline(pipe, transport, steps=steps)


def test_step_ranges_are_refused_for_text_encoders(fitted):
    pipe, transport, _ = fitted["sd"]
    before = hooks(pipe)
    with pytest.raises(ActError, match="also steers text_encoder, whose output conditions"):
        steer_pipeline(pipe, transport, steps=(0.5, 1.0))
    assert hooks(pipe) == before


def test_a_step_range_needs_the_pipelines_own_timesteps(fitted):
    pipe, _, transport = fitted["sd"]
    with torch.no_grad(), steer_pipeline(pipe, transport, steps=(0.0, 0.5)):
        pipe.scheduler.set_timesteps(2)
        pipe.unet(torch.randn(1, 4, 16, 16), 501, torch.randn(1, 77, 32))  # in the schedule
        with pytest.raises(ActError, match="cannot tell which sampling step"):
            pipe.unet(torch.randn(1, 4, 16, 16), 123, torch.randn(1, 77, 32))


def test_img2img_shares_transports_and_counts_steps_in_the_full_schedule(fitted):
    from diffusers import StableDiffusionImg2ImgPipeline

    sd, _, transport = fitted["sd"]
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"image": image, "strength": 0.5, "num_inference_steps": 4}  # steps 2 and 3 of 4
    plain = images(pipe, **kwargs)
    with steer_pipeline(pipe, transport, steps=(0.0, 0.5)):
        assert torch.equal(images(pipe, **kwargs), plain)
    with steer_pipeline(pipe, transport, steps=(0.5, 1.0)):
        assert not torch.equal(images(pipe, **kwargs), plain)
    samples = collect_pipeline(pipe, SOURCE, TARGET, at_steps=(1,), **options(pipe, **kwargs))
    assert samples.info["pipeline"]["class"] == "StableDiffusionImg2ImgPipeline"
    with pytest.raises(ActError, match=r"step\(s\) \[2\] never ran"):
        collect_pipeline(pipe, SOURCE, TARGET, at_steps=(2,), **options(pipe, **kwargs))


def test_act_steer_refuses_objects_it_cannot_steer(fitted):
    _, transport, _ = fitted["sd"]
    with pytest.raises(ActError, match="cannot steer a str"):
        act.steer("a pipeline", transport)
