"""Validation shared by every config schema (models/, training/) and the Hydra entry points.

A schema is a dataclass whose `__post_init__` checks its own fields with `require` / `choice`, naming each
key relative to its own node (`lr`, `transformer.arch`). `validate(schema, cfg)` merges a composed Hydra
tree into the schema and turns any failure into one `ConfigError` whose message starts with the full key:
`train.lr: must be > 0, got -1.0`. `compose(name, overrides)` composes a primary config as Hydra does, with
its composition errors (a bad type, an unknown key) as `ConfigError` too. `hydra_main` is `hydra.main` for
an entry point: it validates before the task runs (and for `--cfg`, which skips the task) and prints a user
error as that one line, exit status 2.

Defaults live in the dataclasses only; a YAML file sets just the keys its choice changes. A primary config
puts its schema first in its defaults list (`- train_schema`, registered in Hydra's ConfigStore by
`register_schema`), so every key exists for command-line overrides and `--cfg job` shows every value.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

T = TypeVar("T")

CONFIGS = str(Path(__file__).resolve().parent / "configs")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the full key."""


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise `ValueError("<key>: <rule>, got <value>")` unless `ok`."""
    if not ok:
        raise ValueError(f"{key}: {rule}, got {value!r}")


def choice(key: str, value: Any, allowed: tuple | list) -> None:
    require(value in allowed, key, f"must be one of {list(allowed)}", value)


def _error_path(node: DictConfig, path: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The path of the deepest sub-node whose own validation raises ValueError."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (None, dict):
            try:
                OmegaConf.to_object(child)
            except ValueError:
                return _error_path(child, (*path, str(key)))
    return path


def _with_path(path: tuple[str, ...], message: str) -> str:
    """Prefix `message` with `path`, merging the part the message already names (`vae.dtype ...`)."""
    for i in range(len(path)):
        tail = ".".join(path[i:])
        if message.startswith(tail) and message[len(tail) : len(tail) + 1] in (".", "=", ":", " "):
            return ".".join(path[:i] + (message,)) if i else message
    return ".".join((*path, message))


def _omegaconf_message(err: Exception) -> str:
    lines = str(err).splitlines()
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    return f"{key}: {lines[0]}" if key else lines[0]


def validate(schema: type[T], cfg: Any) -> T:
    """Merge `cfg` (DictConfig or dict) into `schema` and return the validated dataclass instance.

    Raises ConfigError whose message starts with the full key of the bad value (relative to `cfg`)."""
    if isinstance(cfg, DictConfig):  # plain values: a composed node typed by the schema (its defaults list)
        cfg = OmegaConf.to_container(cfg)  # carries the keys a `+key=` added to it past the schema's check
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except Exception as err:  # OmegaConf's errors carry the full key on a `full_key:` line
        raise ConfigError(_omegaconf_message(err)) from err
    try:
        return OmegaConf.to_object(merged)
    except ValueError as err:
        raise ConfigError(_with_path(_error_path(merged), str(err))) from err
    except Exception as err:
        raise ConfigError(_omegaconf_message(err)) from err


def register_schema(name: str, schema: type) -> None:
    """Make `schema` (its defaults) the config `name` that a primary config's defaults list starts with."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema)


def compose(config_name: str, overrides: list[str] = (), config_dir: str = CONFIGS) -> DictConfig:
    """configs/<config_name>.yaml composed with `overrides` (no `hydra` node), as a run gets it; a bad
    override raises ConfigError naming its key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except HydraException as err:  # the OmegaConf error it wraps names the full key
            cause = err.__cause__ if err.__cause__ is not None else err
            raise ConfigError(_omegaconf_message(cause)) from err


def _pop_extra(cfg: DictConfig, extra_keys: tuple[str, ...]) -> dict:
    """Remove an entry point's own `+key=` options (not part of its schema) from `cfg`; returns them."""
    with open_dict(cfg):
        return {k: cfg.pop(k) for k in extra_keys if k in cfg}


def _exit_on_error(check: Callable[[], T]) -> T:
    """`check()`, or its ConfigError's one line on stderr and exit status 2 (no traceback: a user error)."""
    try:
        return check()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def _check_command_line(schema: type, config_name: str, extra_keys: tuple[str, ...]) -> None:
    """Compose and validate the command line's config before Hydra runs: its own errors (a bad override)
    would print several lines, and `--cfg` prints the config without running the task. Uses Hydra's own
    argument parser; a sweep (`-m`) composes per job, so its jobs validate when they run."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    if args.multirun or args.help or args.hydra_help or args.info or args.shell_completion:
        return
    name = args.config_name or config_name
    cfg = _exit_on_error(lambda: compose(name, args.overrides, args.config_dir or CONFIGS))
    _pop_extra(cfg, extra_keys)
    _exit_on_error(lambda: validate(schema, cfg))


def hydra_main(
    schema: type[T], config_name: str, extra_keys: tuple[str, ...] = ()
) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """`hydra.main` on configs/<config_name>.yaml for a task taking the validated `schema` instance.

    `extra_keys`: the entry point's own `+key=` options, removed before validation and passed to the task
    as keyword arguments (`task(config, rank=3)`). A config error prints `config error: <full key>: <rule>,
    got <value>` and exits with status 2, also under `--cfg` and when the task raises one (outside a sweep).
    `schema` must be registered (`register_schema`) and first in the config's defaults list.
    """
    import hydra

    def decorator(task: Callable[..., None]) -> Callable[[], None]:
        @functools.wraps(task)  # Hydra unwraps it: the job is named after the task's script (train.log)
        def run(cfg: DictConfig) -> None:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            extra = _pop_extra(cfg, extra_keys)
            check = functools.partial(validate, schema, cfg)
            # In a sweep, a job's config error fails that job only: Hydra records it and runs the others
            # (training.sweep lists it in the sweep's table); an exit would end the whole sweep.
            sweep = HydraConfig.get().mode == RunMode.MULTIRUN
            if sweep:
                task(check(), **extra)
            else:  # also one the task finds once its models are built (a size their strides reject)
                config = _exit_on_error(check)
                _exit_on_error(lambda: task(config, **extra))

        main = hydra.main(config_path=CONFIGS, config_name=config_name, version_base="1.3")(run)

        @functools.wraps(task)
        def entry() -> None:
            _check_command_line(schema, config_name, extra_keys)
            main()

        return entry

    return decorator
