"""Diffusers front end: pipelines (SD 1.x/2.x, SDXL, FLUX, ...) steered and fitted in one call.

A pipeline's anatomy (`anatomy`: components, one module root over them, fingerprints, which
sampling step a denoiser call belongs to), pipeline calls as collection batches (`batches`),
the paper's layer choices (`presets`, registered in `act.PRESETS`), collecting and fitting
(`collection`: `collect_pipeline`, `fit_pipeline`), steering with step ranges and the
conditional branch only (`steering`: `steer_pipeline`), and shipped image caption sets with
the source/target prompt pairs made from them (`captions`).

May import: the core (`act.*` top-level modules), torch and tqdm. Pipelines are duck-typed (a
`components` dict and a `scheduler`): nothing here imports diffusers at module level, nor
the text front end or ComfyUI.
"""

from .anatomy import is_pipeline
from .collection import collect_pipeline, fit_pipeline
from .steering import PipelineSteering, steer_pipeline

__all__ = ["PipelineSteering", "collect_pipeline", "fit_pipeline", "is_pipeline", "steer_pipeline"]
