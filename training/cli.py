"""``steerserve train <recipe> --config FILE.yaml --output DIR [--set key=value ...]``.

Recipes are looked up in :data:`RECIPES` and imported only when run; their
modules import torch/TRL inside functions, so ``--help`` is instant::

    from steerserve.training.cli import main
    main(["dpo", "--config", "training/recipes/dpo-tiny.yaml", "--output", "runs/dpo-tiny"])
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from steerserve.training.config import ConfigError, field_help, load_config
from steerserve.training.data.io import DataError
from steerserve.training.output import OutputExists

logger = logging.getLogger(__name__)

# recipe -> module with CONFIG (a dataclass) and run(config, output, force) -> Path
RECIPES: dict[str, str] = {
    "sft": "steerserve.training.sft",
    "dpo": "steerserve.training.dpo",
    "apm": "steerserve.training.apm",
    "bootstrap": "steerserve.training.bootstrap",
    "annotate": "steerserve.training.annotate",
    "acsft": "steerserve.training.acsft",
}
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def _settings_help(module_name: str) -> str:
    """The recipe config's fields with their help, for ``<recipe> --help``."""
    config_cls = importlib.import_module(module_name).CONFIG
    lines = [f"settings (YAML keys or --set key=value) of {config_cls.__name__}:"]
    lines += [f"  {name} (default {default!r}): {text}" for name, text, default in field_help(config_cls)]
    return "\n".join(lines)


def build_parser(recipe: str | None = None) -> argparse.ArgumentParser:
    epilog = _settings_help(RECIPES[recipe]) if recipe in RECIPES else (
        f"recipes: {', '.join(RECIPES)}; tiny examples in {RECIPE_DIR}/<recipe>-tiny.yaml"
    )
    parser = argparse.ArgumentParser(
        prog="steerserve train", description="Train (or annotate) with one recipe; writes DIR/manifest.json.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="what to run")
    parser.add_argument("--config", type=Path, help="recipe YAML (settings); relative paths inside: see docs")
    parser.add_argument("--output", type=Path, required=True, help="output directory (written atomically)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--force", action="store_true", help="overwrite a finished output / discard a partial one")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps (annotate: ignored)")
    parser.add_argument("--limit", type=int, help="use at most N rows")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one recipe; 0 on success, 2 on bad settings/data, 1 when the output exists."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(recipe).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(RECIPES[args.recipe])
    try:
        config = load_config(module.CONFIG, args.config, args.overrides, max_steps=args.max_steps, limit=args.limit)
        started = time.perf_counter()
        output = module.run(config, args.output, force=args.force)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"steerserve train {args.recipe}: {error}", file=sys.stderr)
        return 2
    except OutputExists as error:
        print(f"steerserve train {args.recipe}: {error}", file=sys.stderr)
        return 1
    print(f"{args.recipe}: wrote {output} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
