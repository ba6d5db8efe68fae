"""The `loftq-jax` command line: `study` (quantization-error study) and `init` (LoftQ adapters for a model)."""

import argparse
import logging
import sys

from loftq_jax import runtime
from loftq_jax.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    from loftq_jax import init_model, study

    parser = argparse.ArgumentParser(
        prog="loftq-jax", description="LoftQ and QLoRA initialization of LoRA adapters for quantized models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    study.add_arguments(
        commands.add_parser(
            "study",
            help="measure quantization error with and without LoftQ over every target weight of a model",
            description="Measure quantization error with and without LoftQ over every target weight of a model.",
        )
    )
    init_model.add_arguments(
        commands.add_parser(
            "init",
            help="quantize a model and write LoftQ-initialized LoRA adapters in PEFT's layout",
            description="Quantize a model and write LoftQ-initialized LoRA adapters in PEFT's layout.",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # JAX logs backend probing (such as a missing TPU) at INFO; only its warnings concern users.
    logging.getLogger("jax").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    runtime.configure()
    try:
        with runtime.remember_interrupts():
            args.run(args)
    except InputError as error:
        print(f"loftq-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loftq-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
