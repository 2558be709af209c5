"""ptqflow: experiment-tracked post-training quantization for small image classifiers.

The Python API is `ptqflow.quantize` (see `ptqflow.pipelines.api`); the command line is `ptqflow` or
`python -m ptqflow`. The package's rooms, bottom layer first: `ptqflow.common` (errors, interrupts, files),
`ptqflow.models` and `ptqflow.tracking`, then `ptqflow.pipelines`; docs/architecture.md draws them.
"""

from __future__ import annotations

from pathlib import Path

# A wheel installs the rooms inside this package. In a source checkout they are the repository's top-level folders
# (pyproject.toml maps them with package-dir); when the checkout runs without being installed (`python -m ptqflow`
# from its root, as `mlflow run .` does in a fresh environment) they are found beside this folder.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "pipelines").is_dir() and (_CHECKOUT / "pipelines" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__)

__all__ = ["quantize", "QuantizeResult", "VariantReport"]


def __getattr__(name: str):
    # Imported on first use: `import ptqflow.models...` must not pull in the pipelines layer (and torch/mlflow).
    if name in __all__:
        from ptqflow.pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'ptqflow' has no attribute {name!r}")
