"""Convert a BERT checkpoint between Google TF, Hugging Face and bert_mini formats.

    python -m bert_mini.convert --src ../shared/data/checkpoints/all-minilm-l6-v2 \
        --dst /tmp/minilm-tf --format tf

The source format is detected from its files. By default every head the source has is kept
(``--head auto``); ask for another head with ``--head`` plus ``--new-head`` (create it fresh) or
``--drop-heads`` (drop the ones the source has). The destination is written atomically.
"""

import argparse
import logging
import sys

from bert_mini import checkpoints
from bert_mini.model import HEAD_CHOICES, count_params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bert_mini.convert",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--src", required=True, help="source checkpoint directory (or TF prefix)")
    parser.add_argument("--dst", required=True, help="destination directory")
    parser.add_argument(
        "--format", required=True, choices=checkpoints.FORMATS, help="destination format"
    )
    heads = ["auto", "none"] + [h for h in HEAD_CHOICES if h is not None]
    parser.add_argument(
        "--head",
        default="auto",
        choices=heads,
        help="head to keep (default: auto = every head the source has)",
    )
    parser.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="labels of a new classifier (default: from the source, else 2)",
    )
    parser.add_argument(
        "--new-head", action="store_true", help="create a head the source lacks with random init"
    )
    parser.add_argument(
        "--drop-heads", action="store_true", help="drop source heads that --head does not keep"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --dst if it exists (atomically)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bert_mini").setLevel(logging.INFO)
    head = None if args.head == "none" else args.head
    try:
        model, tokenizer, report = checkpoints.load_pretrained(
            args.src,
            head,
            args.num_labels,
            new_head=args.new_head,
            drop_heads=args.drop_heads,
        )
        checkpoints.save_pretrained(
            model, tokenizer, args.dst, args.format, overwrite=args.overwrite
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.format} checkpoint to {args.dst}: head={report.head}, "
        f"{count_params(model):,} parameters, "
        f"{model.config.num_hidden_layers} layers x {model.config.hidden_size} hidden"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
