"""Command-line options shared by the commands that prefill videos (`statekv prefill`, `statekv index`).

The prefill settings' flags come from `statekv.settings.PrefillSettings` (one definition: names, help, defaults);
this module adds the ones that are not settings of the prefill (the video decoder, int8 storage, --overwrite) and
turns a bad combination into a usage error (exit 2) before any model loads.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from statekv.settings import PrefillSettings

VIDEO_BACKENDS = ("auto", "decord", "pyav")  # statekv.video.BACKENDS, spelled out: --help imports no decoder


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """The prefill settings' flags (PrefillSettings.add_cli_args), the decoder and storage flags, --overwrite."""
    PrefillSettings.add_cli_args(parser)
    parser.add_argument("--backend", default="auto", choices=list(VIDEO_BACKENDS),
                        help="video decoder: auto = PyAV, falling back to decord when PyAV cannot open or decode")
    parser.add_argument("--int8", action="store_true", default=None,
                        help="store K/V as int8 with scales (recorded as the cache's storage)")
    parser.set_defaults(check=functools.partial(check_prefill_options, parser))
    parser.add_argument("--overwrite", action="store_true",
                        help="redo videos whose cache is committed already (default: skip them, so a rerun resumes)")


def check_prefill_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors across the flags (exit 2, naming the flag), and `args.settings`: the `PrefillSettings` they
    ask for (None for a resume: it continues with its cache's, `resume_settings`)."""
    args.settings = None
    try:
        settings = PrefillSettings.from_cli_args(args)
    except ValueError as err:
        parser.error(str(err))
    if not getattr(args, "resume", False):
        args.settings = settings
        args.int8 = bool(args.int8)


def resume_settings(args: argparse.Namespace, manifest: dict[str, Any], where: str) -> PrefillSettings:
    """The settings a resume of the committed cache `manifest` (at `where`) continues with: the cache's own. A flag
    given with another value than the cache's is refused (ValueError naming the flag, both values and the way
    out), `--int8` included (the cache's storage); `--vision-batch-frames`, which caches do not record, is taken as
    given."""
    int8 = manifest["storage"] == "int8"
    if args.int8 is not None and bool(args.int8) != int8:
        raise ValueError(f"{where}: --int8 differs from the cache's storage ({manifest['storage']}); a resume "
                         "continues with the settings the cache was made with (leave the flag out, or --overwrite "
                         "to prefill anew)")
    args.int8 = int8
    return PrefillSettings.from_record(manifest["prefill"]).resumed_with(PrefillSettings.given_flags(args), where)
