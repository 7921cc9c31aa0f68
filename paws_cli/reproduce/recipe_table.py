"""What `paws recipes ls` shows: each named recipe's resolved global numbers (sizes in recipes are per process).

Recipes for data the user must point to (ImageNet, CIFAR-10) leave ``data.path`` null on purpose; for the
listing they are resolved with a stand-in path, which nothing reads. Recipes whose name starts with ``_`` are
bases for ``base:`` inheritance, not runs, and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

from paws_cli.config import Settings, load_settings, recipe_description, recipe_names
from paws_cli.config.loader import load_recipe_tree
from paws_cli.methods.sizes import global_sizes

#: Stand-in for a data.path the recipe leaves to the user (never opened: listing only validates settings).
PATH_PLACEHOLDER = "<data.path>"


@dataclass(frozen=True)
class RecipeRow:
    """One recipe as `paws recipes ls` shows it."""

    name: str
    model: str
    labels: str
    world_size: int
    global_batch: int
    global_support: str
    schedule: str  # '100 epochs' or '2342 steps': what the recipe's optim section gives
    description: str


def listed_recipes() -> list[str]:
    """Names of the runnable recipes (bases starting with '_' left out)."""
    return [name for name in recipe_names() if not name.startswith("_")]


def load_for_listing(name: str) -> Settings:
    """The recipe's settings; a data.path it leaves unset is filled with a stand-in."""
    data = load_recipe_tree(name).get("data") or {}
    needs_path = data.get("dataset") in ("cifar10", "imagefolder", "array") and data.get("path") is None
    return load_settings(name, [f"data.path={PATH_PLACEHOLDER}"] if needs_path else [], environ={})


def global_support(settings: Settings) -> tuple[int, int, int]:
    """(classes, images per class, views) of the global support at the recipe's world size (spec section 2)."""
    sizes = global_sizes(settings)
    return sizes.support_classes, sizes.support_images, sizes.support_views


def support_text(settings: Settings) -> str:
    """The global support as `paws recipes ls` shows it: 'classes x images [x views]', the labelled sub-batch
    that joins each batch ('sub-batch N'), or 'none' (labelled images at their natural rate in the batch)."""
    sizes = global_sizes(settings)
    if sizes.support is not None:
        views = sizes.support_views
        return f"{sizes.support_classes} x {sizes.support_images}" + (
            f" x {views} views" if views > 1 else ""
        )
    return f"sub-batch {sizes.sub_batch}" if sizes.sub_batch else "none"


def labels_text(settings: Settings) -> str:
    """How the labelled subset is chosen: an official list (its key), a split file, or a seeded draw."""
    d = settings.data
    if d.split is not None:
        return d.split.removeprefix("official:")  # an official list by its key ("1%"), else the file
    if d.label_percent is not None:
        return f"{d.label_percent:g}% per class"
    return f"{d.labels_per_class} per class"


def schedule_text(settings: Settings) -> str:
    """The training length as the recipe states it: in epochs, or in steps (optim.total_steps)."""
    o = settings.optim
    return f"{o.epochs:g} epochs" if o.epochs is not None else f"{o.total_steps} steps"


def recipe_row(name: str) -> RecipeRow:
    """The listing row of one recipe."""
    s = load_for_listing(name)
    support = support_text(s)
    return RecipeRow(
        name=name,
        model=s.model.backbone,
        labels=labels_text(s),
        world_size=s.world_size,
        global_batch=s.optim.batch_size * s.world_size,
        global_support=support,
        schedule=schedule_text(s),
        description=recipe_description(name),
    )
