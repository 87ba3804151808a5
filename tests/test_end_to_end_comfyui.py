"""End-to-end fitting in a real ComfyUI, in-process: Fit Transport trains the maps through the
models that Collect Activations ran, under ComfyUI's inference mode.

The tiny models are built inside `torch.inference_mode()`, as ComfyUI's loaders build them
while a node runs, and every node runs inside it too (as ComfyUI's executor runs nodes), so
their weights are inference tensors that autograd would refuse to save.

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


@pytest.fixture(scope="module")
def pack():
    """The pack's nodes in ComfyUI (started once per process; an earlier module's base folder
    may be gone, so transport files get a folder of their own)."""
    base = temporary_base()
    start_once(base)
    with own_model_folders(base, ("act",)):
        nodes = pack_nodes()
        errors = importlib.import_module(f"{PACK}.act.errors")
        yield SimpleNamespace(nodes=nodes, error=errors.ActError)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(pack):
    """A tiny SD1.5-config MODEL and a CLIP, loaded as ComfyUI loads checkpoints."""
    with torch.inference_mode():
        return tiny_model("sd15"), tiny_clip()


def _collect(pack, model, clip, **overrides):
    arguments = dict(
        model=model, clip=clip, source_prompts=SOURCE, target_prompts=TARGET,
        where="diffusion model", layers="layer norms only", seed=0, width=64, height=64,
        steps=1, batch_size=2, causal=False, method="linear", support="all", cache="off",
    )  # fmt: skip
    arguments.update(overrides)
    with torch.inference_mode():
        return pack.nodes["AcTCollectActivations"].execute(**arguments).result[0]


def _fit(pack, samples, **options):
    with torch.inference_mode():
        output = pack.nodes["AcTFitTransport"].execute(
            samples=samples, support="all", method="end-to-end", **options
        )
    return output.result[0], output.ui.as_dict()["text"][0]


def _state(*modules):
    return {
        (index, name): (tensor, tensor.clone())
        for index, module in enumerate(modules)
        for name, tensor in module.state_dict(keep_vars=True).items()
    }


def _unchanged(state, *modules) -> bool:
    now = {
        (index, name): tensor
        for index, module in enumerate(modules)
        for name, tensor in module.state_dict(keep_vars=True).items()
    }
    return set(now) == set(state) and all(
        now[key] is original and original.is_inference() and torch.equal(original, copy)
        for key, (original, copy) in state.items()
    )


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_fit_trains_the_maps_through_the_loaded_model_and_leaves_it_as_it_was(pack, kind):
    # FLUX's double blocks add to the image and text streams in place (`img += ...`)
    with torch.inference_mode():
        model, clip = tiny_model(kind), tiny_clip()
    unet = model.model.diffusion_model
    layers = "layer norms only" if kind in ("sd15", "sdxl") else "auto"
    samples = _collect(pack, model, clip, layers=layers)
    state = _state(unet)
    transport, summary = _fit(pack, samples, training_steps=8, learning_rate=0.05)
    assert transport.method == "end-to-end" and transport.sites == samples.sites
    losses = transport.info["end-to-end"]["loss"]
    assert losses["fitted"] < 0.9 * losses["plain"], losses
    assert "loss" in summary and "->" in summary
    assert _unchanged(state, unet)  # the same inference tensors, bit for bit
    assert _hooks(unet) == 0
    # the transport steers through AcT Apply like any other; strength 0 is the plain model
    conds = encode(clip, "a photo of a cat"), encode(clip, "")
    options = {"size": 8}
    apply = pack.nodes["AcTApply"].execute
    with torch.inference_mode():
        plain = sample(model, *conds, **options)
        steered = {
            strength: apply(
                transport=transport, model=model, strength_model=strength, strength_clip=0.0,
                start_percent=0.0, end_percent=1.0, apply_to="both branches",
            ).result[0]
            for strength in (0.0, 1.0)
        }  # fmt: skip
        assert torch.equal(sample(steered[0.0], *conds, **options), plain)
        assert not torch.allclose(sample(steered[1.0], *conds, **options), plain, atol=1e-4)


@pytest.mark.parametrize("where", ["text encoder", "both"])
def test_fit_trains_through_the_text_encoder_that_adds_in_place(pack, where):
    # ComfyUI's CLIP layers do `x += self_attn(layer_norm1(x))`
    with torch.inference_mode():
        model, clip = tiny_model("sd15"), tiny_clip()
    encoder = clip.cond_stage_model
    samples = _collect(pack, model, clip, where=where)
    parts = {site.partition(".")[0] for site in samples.sites}
    assert parts == ({"clip"} if where == "text encoder" else {"clip", "diffusion_model"})
    state = _state(encoder, model.model.diffusion_model)
    # with "both", the diffusion model's maps also follow the text encoder's maps' moves
    transport, _ = _fit(pack, samples, training_steps=20, learning_rate=0.05)
    losses = transport.info["end-to-end"]["loss"]
    assert losses["fitted"] < 0.9 * losses["plain"], losses
    assert _unchanged(state, encoder, model.model.diffusion_model)
    assert _hooks(encoder) == 0 and _hooks(model.model.diffusion_model) == 0
    apply = pack.nodes["AcTApply"].execute
    with torch.inference_mode():
        plain = encode(clip, "a photo of a cat")[0][0]
        steered = {
            strength: apply(
                transport=transport, model=model, clip=clip, strength_model=0.0,
                strength_clip=strength, start_percent=0.0, end_percent=1.0,
                apply_to="both branches",
            ).result[1]
            for strength in (0.0, 1.0)
        }  # fmt: skip
        assert torch.equal(encode(steered[0.0], "a photo of a cat")[0][0], plain)
        moved = encode(steered[1.0], "a photo of a cat")[0][0]
        assert not torch.allclose(moved, plain, atol=1e-4)


def test_cancel_stops_the_fit_and_leaves_the_model_alone(pack, loaded, monkeypatch):
    import comfy.model_management

    model, clip = loaded
    samples = _collect(pack, model, clip)
    unet = model.model.diffusion_model
    state = _state(unet)
    steps = []

    def interrupt_at_third_step():
        steps.append(1)
        if len(steps) >= 3:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(
        comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_at_third_step
    )
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _fit(pack, samples, training_steps=20)
    assert len(steps) == 3 and _unchanged(state, unet) and _hooks(unet) == 0


def test_end_to_end_needs_samples_from_collect_and_no_causal_collection(pack, loaded):
    model, clip = loaded
    samples = _collect(pack, model, clip)
    plain = importlib.import_module(f"{PACK}.act").Samples(samples.source, samples.target)
    with pytest.raises(pack.error, match="straight from AcT Collect Activations"):
        _fit(pack, plain)
    causal = _collect(pack, model, clip, causal=True)
    with pytest.raises(pack.error, match="turn Collect's 'causal' off"):
        _fit(pack, causal)
    with pytest.raises(pack.error, match="learning_rate must be a positive number"):
        _fit(pack, samples, learning_rate=0.0)


def test_a_model_autograd_cannot_differentiate_is_refused_by_name(pack, loaded, monkeypatch):
    model, clip = loaded
    samples = _collect(pack, model, clip)
    module = importlib.import_module(f"{PACK}.nodes.end_to_end")
    import comfy.model_management

    def no_backward(*args, **kwargs):
        assert comfy.model_management.in_training  # ComfyUI's training switch is on
        raise RuntimeError("Trying to backward through op but no autograd formula was registered")

    monkeypatch.setattr(module, "fit_end_to_end", no_backward)
    with pytest.raises(pack.error, match=r"SD15.*operation that has no gradient.*'linear'"):
        _fit(pack, samples, training_steps=2)
    assert not comfy.model_management.in_training  # and off again


def test_the_loss_of_every_step_is_shown_under_the_running_node(pack, loaded, monkeypatch):
    import server
    from comfy_execution.utils import CurrentNodeContext

    shown = []
    fake = SimpleNamespace(send_progress_text=lambda text, node: shown.append((node, text)))
    monkeypatch.setattr(server.PromptServer, "instance", fake, raising=False)
    model, clip = loaded
    samples = _collect(pack, model, clip)
    with CurrentNodeContext("prompt", "7"):
        _fit(pack, samples, training_steps=3)
    assert [node for node, _ in shown] == ["7"] * 3
    assert [text.split(":")[0] for _, text in shown] == ["step 1/3", "step 2/3", "step 3/3"]
    assert float(shown[-1][1].split("loss ")[1]) > 0


def test_saved_activation_copies_differentiate_in_place_additions_exactly(pack):
    module = importlib.import_module(f"{PACK}.nodes.autograd_copies")
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(6).requires_grad_(False)
    start = torch.randn(4, 6)

    def gradient(in_place: bool) -> torch.Tensor:
        scale = torch.full((6,), 1.5, requires_grad=True)
        x = start * scale
        for _ in range(2):
            if in_place:
                x += torch.tanh(norm(x))  # as ComfyUI's CLIP layers and FLUX blocks do
            else:
                x = x + torch.tanh(norm(x))
        (x**2).sum().backward()
        return scale.grad

    with pytest.raises(RuntimeError, match="inplace operation"):
        gradient(in_place=True)  # what autograd says without the copies
    with module.saved_activation_copies():
        copied = gradient(in_place=True)
    assert torch.allclose(copied, gradient(in_place=False), atol=1e-6)
    # a saved tensor that needs no gradient is kept as it is, and changed in place it is refused
    scale = torch.ones(6, requires_grad=True)
    weight = torch.randn(6)
    with module.saved_activation_copies():
        product = (start * scale) * weight
        weight += 1
    with pytest.raises(RuntimeError, match=module.MODIFIED_IN_PLACE):
        product.sum().backward()
