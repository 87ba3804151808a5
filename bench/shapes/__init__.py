"""Shapes world: a small text-to-image benchmark whose semantics we control.

`world` draws and renders scenes, `captions` words them, `model` builds the diffusers
pipeline, `train` (with `optimise`) trains it, `scorers` reads colours and shapes back from
pixels, `fidelity` measures how often generated images match their captions, and `steering`
measures AcT style control and concept negation on the trained model.
"""
