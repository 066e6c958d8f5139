"""DALL·E mini in JAX/Flax: text -> DalleBart image codes -> VQGAN pixels -> CLIP reranking.

    from model import load_pipeline
    result = load_pipeline().generate("a red apple on a blue background", seed=0)

The names below are imported on first use, so `import model.text` does not pull in the pipeline.
"""

_PUBLIC = {"Pipeline": "pipeline", "GenerationResult": "pipeline", "Progress": "pipeline", "Request": "pipeline",
           "image_grid": "pipeline", "load_pipeline": "loading", "Options": "options"}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"model.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
