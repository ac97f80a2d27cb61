"""`VMoBAConfig`: every knob of VMoBA attention, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

PARTITION_KINDS = ("1d", "2d", "3d")
SELECTIONS = ("threshold", "topk")
SCOPES = ("query", "head", "block", "overall")
GRANULARITIES = ("token", "block")


def _positive_ints(name: str, value, length: int) -> tuple[int, ...]:
    """`value` as a tuple of `length` positive ints, or a ValueError naming `name`."""
    items = (value,) if isinstance(value, int) else tuple(value)
    if len(items) != length or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be {length} int(s), got {value!r}")
    if min(items) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return items


@dataclass
class VMoBAConfig:
    """VMoBA settings (see docs/vmoba.md for the semantics of every field).

    Plain python types only, so `VMoBAConfig(**omegaconf_dict)` works; lists are accepted for the tuple
    fields. Invalid values raise `ValueError` naming the field and the allowed values.
    """

    partitions: list[str] = field(default_factory=lambda: ["1d", "2d", "3d"])
    block_1d: int = 2
    block_2d: tuple[int, int] = (4, 8)
    block_3d: tuple[int, int, int] = (4, 4, 8)
    selection: str = "threshold"
    threshold: float = 0.25
    topk_1d: int = 3
    topk_2d: int = 20
    topk_3d: int = 15
    scope: str = "query"
    granularity: str = "block"
    dense_first_layers: int = 0
    dense_first_steps: int = 0

    def __post_init__(self):
        self.partitions = list(self.partitions)
        if not self.partitions or any(p not in PARTITION_KINDS for p in self.partitions):
            raise ValueError(
                f"partitions must be a non-empty list of {PARTITION_KINDS}, got {self.partitions!r}"
            )
        self.block_1d = _positive_ints("block_1d", self.block_1d, 1)[0]
        self.block_2d = _positive_ints("block_2d", self.block_2d, 2)
        self.block_3d = _positive_ints("block_3d", self.block_3d, 3)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        self.threshold = float(self.threshold)
        for kind in PARTITION_KINDS:
            name = f"topk_{kind}"
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        for name in ("dense_first_layers", "dense_first_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def partition_for_layer(self, layer_idx: int) -> str:
        """The partition kind ("1d" | "2d" | "3d") of layer `layer_idx` (the recurrent cycle)."""
        return self.partitions[layer_idx % len(self.partitions)]

    def block_for(self, kind: str) -> tuple[int, int, int] | tuple[int, int] | int:
        """The configured block size of partition `kind`."""
        return {"1d": self.block_1d, "2d": self.block_2d, "3d": self.block_3d}[kind]

    def topk_for(self, kind: str) -> int:
        """The configured top-k (own block included) of partition `kind`."""
        return getattr(self, f"topk_{kind}")

    def is_dense(self, layer_idx: int, step: int | None) -> bool:
        """Whether layer `layer_idx` at denoising step `step` (None in training) runs dense attention."""
        return layer_idx < self.dense_first_layers or (step is not None and step < self.dense_first_steps)
