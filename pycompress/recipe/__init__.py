"""Recipes: validated YAML pipelines (train, distill, quantize, evaluate, ...) and their runner.

>>> from pycompress.recipe import load_recipe, run_recipe
>>> recipe = load_recipe("recipes/quickstart.yaml", overrides=["qat4.epochs=1"])
>>> report = run_recipe(recipe, "runs/quickstart", resume=True)
"""

from .runner import RunError, Runner, build_from_arch, load_model, model_arch, run_recipe
from .schema import (
    STAGE_KINDS,
    DataSpec,
    ModelSpec,
    Recipe,
    RecipeError,
    StageSpec,
    TeacherSpec,
    apply_overrides,
    dump_recipe,
    load_recipe,
    load_recipe_dict,
    validate,
)

__all__ = [
    "RunError",
    "Runner",
    "build_from_arch",
    "load_model",
    "model_arch",
    "run_recipe",
    "STAGE_KINDS",
    "DataSpec",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "TeacherSpec",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "load_recipe_dict",
    "validate",
]
