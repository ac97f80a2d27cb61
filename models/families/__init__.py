"""The registry of model families: one file per family, one line per family below.

- `Family` (`models.families.base`): name, architectures, model class, blocks, latent grid, self-attention
  processor and the `model_fn` call adapter of one family.
- `FAMILIES`: family name -> `Family`; `ARCHS`: every named architecture of every family -> `Arch`.
- `get_family(name)`, `family_of(model_or_class)`: lookups that raise naming the choices.

Adding a family: write `models/families/<name>.py` exporting `FAMILY = Family(...)` and add it to the
tuple at the bottom (docs/models.md, "Adding a model family").
"""

from diffusers.models.modeling_utils import ModelMixin

from models.families import cogvideox, wan
from models.families.base import Arch, Family, Grid, forward_arg

__all__ = [
    "ARCHS",
    "FAMILIES",
    "Arch",
    "Family",
    "Grid",
    "family_of",
    "forward_arg",
    "get_family",
    "register",
]

FAMILIES: dict[str, Family] = {}
ARCHS: dict[str, Arch] = {}


def register(family: Family) -> Family:
    """Add `family` and its architectures to the registry; names must be new."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = sorted(set(family.archs) & set(ARCHS))
    if taken:
        raise ValueError(f"model family {family.name!r}: architectures {taken} are already registered")
    FAMILIES[family.name] = family
    ARCHS.update({name: Arch(family.name, build) for name, build in family.archs.items()})
    return family


def get_family(name: str) -> Family:
    """The family named `name` (the `model.family` value)."""
    if name not in FAMILIES:
        raise ValueError(f"model.family: must be one of {list(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of(model: ModelMixin | type) -> Family:
    """The family of a model instance or class: the nearest registered class in its MRO."""
    cls = model if isinstance(model, type) else type(model)
    by_class = {f.model_class: f for f in FAMILIES.values()}
    for base in cls.__mro__:
        if base in by_class:
            return by_class[base]
    raise TypeError(
        f"unsupported model {cls.__name__}; supported: {[f.model_class.__name__ for f in FAMILIES.values()]}"
    )


for _family in (wan.FAMILY, cogvideox.FAMILY):
    register(_family)
