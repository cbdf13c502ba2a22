"""Declarative compression recipes: the schema (:mod:`.schema`) and how a recipe runs (:mod:`.runner`)."""

from deepshrink.lazy import lazy_submodules
from deepshrink.recipes.runner import run_recipe
from deepshrink.recipes.schema import Recipe, builtin_recipes, load_recipe, parse_recipe

__all__ = ["Recipe", "builtin_recipes", "load_recipe", "parse_recipe", "run_recipe"]

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
