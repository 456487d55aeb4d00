"""Convert a reference checkpoint to .pdparams once:
`python src/convert.py <in.safetensors|in.pth> <out.pdparams> model=<name> [num_classes=N] [img_size=S]`.
"""
import argparse
import sys

import convitlab  # noqa: F401  (gives Paddle every CPU core)


def parse_overrides(pairs):
    """`key=value` words into keyword arguments (ints where they parse)."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: {pair!r} is not key=value (e.g. model=convit_tiny)")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
    return kwargs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="timm .safetensors, authors' .pth or .pdparams")
    parser.add_argument("target", help="output .pdparams")
    parser.add_argument("overrides", nargs="+", help="model=<name> and any model keyword, e.g. num_classes=1000")
    args = parser.parse_args(argv)
    from convitlab.errors import UserError
    from convitlab.models import create_model
    from convitlab.weights import load_pretrained, save_pdparams

    kwargs = parse_overrides(args.overrides)
    try:
        if "model" not in kwargs:
            raise UserError("model=<name> is required (see convitlab.models.list_models())")
        if not args.target.endswith(".pdparams"):
            raise UserError(f"target={args.target!r} is not allowed: a path ending in .pdparams")
        model = create_model(kwargs.pop("model"), **kwargs)
        load_pretrained(model, args.source)
        save_pdparams(model, args.target)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
