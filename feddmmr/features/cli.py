"""``feddmmr features`` (extract, the default action) and ``feddmmr features check``.

One parser with an optional ``action`` positional keeps ``--data`` & co. shared by both actions
and reuses the main CLI's data arguments unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..cli_args import add_data_args, add_device_arg, emit, int_at_least, load_from_args
from . import EncoderError
from .check import feature_check
from .extract import run_extract
from .visual_encoder import VISUAL_ENCODERS

log = logging.getLogger("feddmmr")


def add_features_parser(sub) -> None:
    parser = sub.add_parser(
        "features", help="extract text/visual item features (default) or check them",
        description="extract (default): write text_features.pt and visual_features.pt to --out. "
                    "check: mean cosine of consecutive training items vs random pairs, per modality.")
    parser.add_argument("action", nargs="?", choices=["extract", "check"], default="extract",
                        help="extract (default) or check")
    add_data_args(parser)
    ex = parser.add_argument_group("extract")
    ex.add_argument("--out", type=Path, help="output folder (e.g. features/ml-1m)")
    ex.add_argument("--text-encoder", default=None,
                    help="sentence-transformers model name or local path (default: all-MiniLM-L6-v2, offline)")
    ex.add_argument("--visual-encoder", choices=VISUAL_ENCODERS, default="efficientnet-lite0")
    ex.add_argument("--clip-path", default=None,
                    help="CLIP model folder (or model id when online); default openai/clip-vit-base-patch32")
    ex.add_argument("--posters", type=Path, default=None, help="poster folder with <raw id>.jpg "
                                                               "(default: DATA/posters)")
    ex.add_argument("--item-text", type=Path, default=None,
                    help="item<TAB>text file keyed by raw item id (default: the dataset's item file, e.g. "
                         "u.item, movies.csv, NAME.item; for ML-1M movies.dat and its plots)")
    ex.add_argument("--modality", choices=["text", "visual", "both"], default="both")
    ex.add_argument("--force", action="store_true", help="recompute even if the input hash matches")
    ex.add_argument("--text-batch", type=int_at_least(1), default=64)
    ex.add_argument("--visual-batch", type=int_at_least(1), default=32)
    ex.add_argument("--workers", type=int_at_least(0), default=None,
                    help="DataLoader workers decoding posters (default: 1 if 2+ cores, else 0)")
    ex.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: all cores)")
    add_device_arg(ex, "the encoders run")
    ex.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ck = parser.add_argument_group("check")
    ck.add_argument("--features", type=Path, help="feature folder to check")
    ck.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random pairs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_features, features_parser=parser)


def cmd_features(args: argparse.Namespace) -> int:
    try:
        return cmd_check(args) if args.action == "check" else cmd_extract(args)
    except EncoderError as exc:
        print(f"feddmmr: error: {exc}", file=sys.stderr)
        return 2


def cmd_extract(args: argparse.Namespace) -> int:
    if args.out is None:
        args.features_parser.error("extract needs --out DIR")
    workers = args.workers if args.workers is not None else (1 if (os.cpu_count() or 1) > 1 else 0)
    data = load_from_args(args)
    modalities = ("text", "visual") if args.modality == "both" else (args.modality,)
    summary = run_extract(data, args.data, args.out, args.text_encoder, args.visual_encoder, args.clip_path,
                          args.posters, args.item_text, modalities, args.force, args.text_batch,
                          args.visual_batch, workers, args.threads, not args.no_progress, args.device)
    if data.item_raw_ids is not None:
        data.save_item_mapping(args.out / "item_mapping.tsv")
    emit(summary, args.json)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.features is None:
        args.features_parser.error("check needs --features DIR")
    data = load_from_args(args)
    emit(feature_check(args.features, data, args.seed), args.json)
    return 0
