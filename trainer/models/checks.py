"""Checks the shape configs of `trainer/models/` share in their `__post_init__`: each error names
`<ConfigClass>.<field>` and the value, as a config error should."""

from __future__ import annotations


def check_positive_ints(cfg, names: tuple[str, ...]) -> None:
    """Raise ValueError unless every field of `cfg` in `names` is an int >= 1 (not a bool)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def check_image_size(cfg, factor_from: str) -> None:
    """Raise ValueError unless `cfg.image_size` is a multiple of `cfg.downsample` (an image
    tokenizer's config); `factor_from` says which fields set the factor, e.g. "group_count=4"."""
    if cfg.image_size % cfg.downsample:
        raise ValueError(
            f"{type(cfg).__name__}.image_size {cfg.image_size} is not a multiple of the "
            f"downsampling factor {cfg.downsample} ({factor_from})"
        )
