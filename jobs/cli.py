"""The `statekv` command line: prefill a video into a stored cache, ask it questions (from every chunk, or from the
chunks retrieval chooses, cited with their time ranges), inspect and list caches, index a video archive with Ray
(`index`), serve questions over HTTP (`serve`) to holders of API keys (`keys`), compare cache settings with the fidelity harness (`eval`), write a
tiny random model (`tiny-model`) and run the whole path on embedded defaults (`demo`).

An entry point only: it parses arguments, calls the library (or the Ray glue in `pipelines/`) and prints. Nothing
heavy is imported before a command runs (`--help` loads no torch), and each command checks its cheap inputs (the
video exists, the cache id is valid, a committed cache makes prefill a no-op, the model directory exists) before it
loads a model or starts Ray. Errors a user can act on (a missing video, model or cache, a corrupt object, a model
mismatch, no S3 credentials, an unreachable endpoint, a device this torch cannot use) are one line on stderr
naming the input and the reason, with exit status 1 (2 for bad arguments); `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from jobs.options import add_prefill_options

EXIT_ERROR = 1
EXIT_USAGE = 2
# torch CPU threads for the model commands. Measured with `python -m jobs.bench_prefill --threads 1|2` on a
# 2-core machine (README, "CPU threads"): one thread was as fast or faster for the tiny and the mid config, and
# it does not fight other processes for cores. --threads 0 keeps torch's own default (one per core).
DEFAULT_THREADS = 1
NOISY_COMMANDS = ("prefill", "ask", "eval", "demo", "tiny-model")  # they run decoders / load models in this process


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line (argparse wraps it)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, a local S3 server, ...)")
    parser.add_argument("--region", help="S3 region (default: from the AWS environment)")


def _storage(args: argparse.Namespace) -> Any:
    if not (getattr(args, "endpoint_url", None) or getattr(args, "region", None)):
        return None
    from statekv.store.fs import StorageOptions

    return StorageOptions(endpoint_url=args.endpoint_url, region=args.region)


def _add_model_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--model", required=required,
                        help="checkpoint directory or hub id (`statekv tiny-model` writes a tiny random one)"
                             + ("" if required else "; default: the model recorded in the cache"))
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch CPU threads (0: torch's own choice, one per core)")


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (else a usage error naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # what argparse names in its message
    return parse


def _add_retrieval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "retrieval", "answer from the prefix and the chunks chosen for the question only (read from the store "
                     "alone), and print them with their time ranges in the video as evidence")
    kind = group.add_mutually_exclusive_group()
    kind.add_argument("--top-k", type=_at_least(1), metavar="K",
                      help="ReKV: the K chunks per layer whose summary keys score highest for the question")
    kind.add_argument("--segments", type=_at_least(1), metavar="K",
                      help="StreamKV: K chunks per layer, taken as whole scenes, best-scoring first")
    group.add_argument("--recent", type=_at_least(0), metavar="N",
                       help="also the last N chunks, always (default: 0 with --top-k, 8 with --segments)")
    group.add_argument("--adaptive", action="store_true",
                       help="with --top-k: share K x layers across layers, more to those whose scores concentrate")
    group.add_argument("--query", choices=["prompt", "question"],
                       help="with --top-k: what scores the chunks — the whole prompt after RoPE (default) or, as ReKV "
                            "publishes it, the bare question before RoPE")


def _check_retrieval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for retrieval flags that need another."""
    if args.top_k is None and args.segments is None and (args.recent is not None or args.adaptive):
        parser.error(f"{'--recent' if args.recent is not None else '--adaptive'} needs --top-k or --segments")
    if args.top_k is None and args.query is not None:
        parser.error("--query goes with --top-k")
    if args.segments is not None and args.adaptive:
        parser.error("--adaptive goes with --top-k, not --segments")


def _check_ask_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) of `ask`; sets `args.questions`, every question in order."""
    _check_retrieval_args(parser, args)
    questions = ([args.question] if args.question is not None else []) + list(args.more_questions)
    if args.questions_file is not None:
        questions += _read_questions(parser, args.questions_file)
    if not questions:
        parser.error("give a QUESTION (or --question TEXT, --questions-file FILE)")
    empty = [i for i, q in enumerate(questions, 1) if not q.strip()]
    if empty:
        parser.error(f"question {empty[0]} is empty")
    if args.stream and len(questions) > 1:
        parser.error(f"--stream answers one question, got {len(questions)}: leave it out (or use --json)")
    args.questions = questions


def _read_questions(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The non-empty lines of a questions file ('-' reads stdin), stripped."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--questions-file {path!r}: {getattr(err, 'strerror', None) or err}")
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        parser.error(f"--questions-file {path!r} holds no question")
    return questions


def _retrieval(args: argparse.Namespace) -> Any:
    """The library's retrieval setting from the flags (None without --top-k / --segments)."""
    from statekv.retrieval import retrieval_setting

    return retrieval_setting(top_k=args.top_k, segments=args.segments, recent=args.recent, adaptive=args.adaptive,
                             query=args.query)


def _format_evidence(evidence: list[Any]) -> str:
    """The chunks an answer attended to, one line each: index, time range in the source video, score, layers."""
    lines = [f"evidence: {len(evidence)} chunk(s)"]
    for e in evidence:
        lines.append(f"  chunk {e.chunk:>4}  {e.start_s:8.2f} s - {e.end_s:8.2f} s  score {e.score:+.4f}  "
                     f"layers {e.layers}")
    return "\n".join(lines)


def _add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statekv", description=_paragraph(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress of the library; print the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # -v also after the command name
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress of the library; print the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description, parents=[common],
                                   formatter_class=HelpFormatter)

    p = command("prefill", "prefill a video and store its cache",
                "Prefill VIDEO chunk by chunk and write its cache to --out. A cache committed at --out already is "
                "left alone (a rerun is a no-op, as with `statekv index`) unless --overwrite or --resume.")
    p.add_argument("video", metavar="VIDEO", help="video path or URL (s3://...)")
    _add_model_args(p, required=True)
    p.add_argument("--out", required=True, metavar="URI",
                   help="cache location <root>/<video_id> (local or s3://); the id: letters, digits, '.', '_', '-'")
    add_prefill_options(p)
    p.add_argument("--resume", action="store_true", help="append VIDEO's frames to the committed cache at --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_json_flag(p, "the committed cache's summary")
    _add_storage_args(p)

    p = command("ask", "answer questions from a stored cache",
                "Answer QUESTION from the cache at URI, without prefilling the video. Several questions (--question "
                "repeated, --questions-file) load the model and the cache once and are answered together, in order. "
                "With --service, ask a running query service about the video whose id is URI (the API key from "
                "$STATEKV_API_KEY).")
    p.add_argument("uri", metavar="URI", help="cache location (with --service: the video id)")
    p.add_argument("question", metavar="QUESTION", nargs="?", help="the question (or give --question / --questions-file)")
    p.add_argument("--question", dest="more_questions", action="append", default=[], metavar="TEXT",
                   help="a question; repeat for several (after QUESTION, if given)")
    p.add_argument("--questions-file", metavar="FILE",
                   help="questions, one per non-empty line ('-': stdin), after the others")
    _add_model_args(p, required=False)
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print tokens as they are generated (one question)")
    out.add_argument("--json", action="store_true",
                     help="print the answer, token ids, finish reason, timings (and evidence) as one JSON object; "
                          "with several questions one object per line, in order")
    _add_retrieval_args(p)
    p.set_defaults(check=functools.partial(_check_ask_args, p))
    _add_storage_args(p)
    p.add_argument("--service", metavar="URL",
                   help="ask the query service at URL (e.g. http://localhost:8000) instead of loading the cache here; "
                        "its API key's secret is read from the environment variable STATEKV_API_KEY")

    p = command("inspect", "describe a stored cache",
                "Print model, policy, frames, tokens, duration, bytes, state size.")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_storage_args(p)

    p = command("ls", "list committed caches under a root",
                "List the committed caches under ROOT with their sizes; a ROOT that does not exist is an error.")
    p.add_argument("root", metavar="ROOT")
    _add_json_flag(p, "the caches (a list under \"caches\")")
    _add_storage_args(p)

    from jobs import eval as eval_job
    from jobs import index_videos, serve

    p = command("index", "index a video archive into caches with Ray", _paragraph(index_videos.__doc__))
    index_videos.add_arguments(p)
    p = command("serve", "answer questions over stored caches over HTTP (Ray Serve)", _paragraph(serve.__doc__))
    serve.add_arguments(p)
    p = command("keys", "create or revoke the query service's API keys",
                "Manage a key file of the query service (`statekv serve --api-keys FILE`, the `api_keys_file` of a "
                "Serve config): `keys new` appends a key and prints its secret once (only a salted scrypt hash is "
                "stored); `keys revoke` removes one. A running service re-reads the file within seconds.")
    actions = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = actions.add_parser("new", help="add a key and print its secret once", formatter_class=HelpFormatter,
                           description="Append a key to FILE (created if missing, mode 0600) and print its secret "
                                       "on stdout, once: give it to the client (Authorization: Bearer <secret>).")
    k.add_argument("--file", required=True, metavar="FILE", help="the key file")
    k.add_argument("--id", required=True, dest="key_id", help="the key's id (letters, digits, '_', '-'), in audit lines")
    videos = k.add_mutually_exclusive_group(required=True)
    videos.add_argument("--prefix", action="append", metavar="PREFIX",
                        help="video-id prefix the key may read (repeat for several)")
    videos.add_argument("--all-videos", action="store_true", help="the key may read every video of its roots")
    k.add_argument("--root", action="append", metavar="ROOT",
                   help="cache root the key may read (repeat; default: any root of a service using this file)")
    k.add_argument("--list", action="store_true", dest="can_list",
                   help="the key may list videos (GET /v1/videos shows only those it may read)")
    k.add_argument("--note", help="a note stored with the entry (who holds it)")
    k = actions.add_parser("revoke", help="remove a key", formatter_class=HelpFormatter,
                           description="Remove key ID from FILE; services using the file refuse it within seconds.")
    k.add_argument("--file", required=True, metavar="FILE", help="the key file")
    k.add_argument("--id", required=True, dest="key_id", help="the key's id")

    p = command("eval", "compare cache settings with Full on videos and questions (fidelity harness)",
                "Prefill each video under Full and under each --settings SPEC, ask every question, and report per "
                "setting the KL and top-1 agreement of the first answer token against Full, greedy agreement, "
                "stored bytes, bytes read per question and latency (with --flops prefill FLOPs, with --dataset "
                "multiple-choice accuracy), as report.md / report.json / fidelity.png under --out, with progress on "
                "stderr. The same harness as `python -m jobs.eval`. Random weights say nothing about real accuracy.")
    eval_job.add_arguments(p)

    p = command("tiny-model", "write a tiny random checkpoint (no download) to try the commands with",
                "Write a tiny random checkpoint of FAMILY (a few MB: random weights, a small tokenizer with the "
                "family's chat template) to DIR, loadable wherever a model is asked for (--model DIR). Its answers "
                "are random tokens: it exercises the whole path, not the words. --list shows the families.")
    p.add_argument("family", metavar="FAMILY", nargs="?", help="model family, e.g. qwen2_vl (see --list)")
    p.add_argument("dir", metavar="DIR", nargs="?", help="folder to write (must not hold a checkpoint already)")
    p.add_argument("--list", action="store_true", help="list the families and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    p = command("demo", "the main job on embedded defaults",
                "Prefill a generated video of the proxy task into a local store with the proxy model that ships "
                "with statekv (or --model / --video), then answer a question from the stored cache, with the "
                "chunks (time ranges) that hold its evidence; for the proxy video it says what the video shows "
                "and whether the answer is right.")
    p.add_argument("--model", help="checkpoint (default: statekv's trained proxy model, a tiny Qwen2-VL)")
    p.add_argument("--video", help="video (default: a generated 12 s proxy-task video)")
    p.add_argument("--out", help="cache root (default: ~/.cache/statekv/caches, or $STATEKV_HOME/caches)")
    p.add_argument("--question", default=None,
                   help="the question asked (default: 'What shape appeared?' on the proxy video)")
    p.add_argument("--capacity", type=int, default=16,
                   help="carried tokens per layer (small so that the sample video exceeds it)")
    p.add_argument("--evidence-chunks", type=int, default=2,
                   help="chunks retrieved (TopK) to show where the evidence is")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch CPU threads (0: torch's own choice, one per core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=_CurrentStderr(),
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"prefill": cmd_prefill, "ask": cmd_ask, "inspect": cmd_inspect, "ls": cmd_ls, "demo": cmd_demo,
               "index": cmd_index, "serve": cmd_serve, "keys": cmd_keys, "eval": cmd_eval, "tiny-model": cmd_tiny_model}
    try:
        if getattr(args, "check", None) is not None:  # a command's checks across its flags (usage errors, exit 2)
            args.check(args)
        with _quiet_native_libraries(enabled=args.command in NOISY_COMMANDS and not args.verbose):
            return handler[args.command](args)
    except KeyboardInterrupt:
        print(f"statekv {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # only the errors a user can act on become one line; the others stay tracebacks
        if not isinstance(err, _user_errors()):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"statekv {args.command}: error: {_one_line(err, args)}", file=sys.stderr)
        return EXIT_ERROR


# --- errors ------------------------------------------------------------------------------------------------------

def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or an unavailable resource (not a bug): ours, OS/IO, bad values, S3 clients'."""
    from statekv.errors import StateKVError

    types: list[type[BaseException]] = [StateKVError, OSError, ValueError]
    if "botocore" in sys.modules:  # only imported once an S3 store was touched
        from botocore.exceptions import BotoCoreError, ClientError

        types += [BotoCoreError, ClientError]
    return tuple(types)


def _remote_inputs(args: argparse.Namespace) -> list[str]:
    names = ("uri", "root", "out", "video", "input", "output", "caches")
    return [v for v in (getattr(args, n, None) for n in names) if isinstance(v, str) and "://" in v
            and not v.startswith("file://")]


def _one_line(err: BaseException, args: argparse.Namespace) -> str:
    """The error as one line; S3 client errors (which name no input) get the command's remote input and a hint."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if "botocore" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        where = ", ".join(_remote_inputs(args)) or "the S3 store"
        if isinstance(err, NoCredentialsError):
            return (f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, or use an instance role)")
        if isinstance(err, EndpointConnectionError):
            endpoint = getattr(args, "endpoint_url", None) or err.kwargs.get("endpoint_url", "")
            return f"{where}: cannot connect to the S3 endpoint {endpoint.split('?')[0]}"
        if isinstance(err, (BotoCoreError, ClientError)):
            return f"{where}: {text}"
    return text


@contextlib.contextmanager
def _quiet_native_libraries(*, enabled: bool) -> Iterator[None]:
    """Keep native libraries' own stderr writes (decord's FFmpeg and its C++ log lines) off the terminal.

    Python's own stderr (progress bars, warnings, our error line) moves to a duplicate of the terminal's file
    descriptor, and descriptor 2, where C code writes, goes to /dev/null until the command ends. Not done when
    stderr is not the process's own (under pytest's capture) or with -v. Python warnings from transformers'
    deprecations are hidden too: they are about our internals, not the user's input.
    """
    if not enabled:
        yield
        return
    import warnings

    kernels = logging.getLogger(KERNELS_LOGGER)
    once = _KernelFallbackOnce()
    kernels.addFilter(once)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            if sys.stderr is not sys.__stderr__ or not _has_fd(sys.stderr):
                yield
            else:
                with _native_stderr_to_devnull():
                    yield
    finally:
        kernels.removeFilter(once)


KERNELS_LOGGER = "transformers.integrations.hub_kernels"  # "`<kernel>` is falling back to its reference PyTorch ..."


class _KernelFallbackOnce(logging.Filter):
    """transformers warns once per kernel that it runs its reference PyTorch implementation (Qwen3.5's four
    linear-attention kernels: 2-4 lines on every command); without -v the first becomes one line for all of them,
    the rest are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "falling back to its reference PyTorch" not in record.getMessage():
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = ("some kernels run transformers' reference PyTorch implementation (correct, "
                                   "slower; install flash-linear-attention and causal-conv1d for the fast ones; "
                                   "-v names them)"), ()
        return True


@contextlib.contextmanager
def _native_stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    python_stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding,
                              errors="backslashreplace")
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = python_stderr
    try:
        yield
    finally:
        python_stderr.flush()
        sys.stderr = sys.__stderr__
        os.dup2(saved, 2)
        os.close(saved)
        python_stderr.close()


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (log lines follow it while native stderr is redirected)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _has_fd(stream: Any) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


# --- commands -------------------------------------------------------------------------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def _engine(model: str, args: argparse.Namespace, settings: Any = None):
    """Load the model with prefill `settings` (a `PrefillSettings`; default: the defaults), after the device check
    (which needs torch but no model)."""
    import torch

    from statekv import Engine
    from statekv.settings import PrefillSettings

    from jobs.checks import quiet_transformers

    _set_threads(getattr(args, "threads", DEFAULT_THREADS))
    quiet_transformers()
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return Engine.from_settings(model, settings if settings is not None else PrefillSettings(), device=args.device,
                                dtype=dtype)


def _check_device(args: argparse.Namespace) -> None:
    """A device this torch cannot use fails before the model loads (imports torch, nothing else)."""
    if getattr(args, "device", None):
        from statekv.locate import check_device

        check_device(args.device)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_prefill(args: argparse.Namespace) -> int:
    from jobs.checks import check_cache_uri, check_model, check_video

    started = time.perf_counter()
    check_cache_uri(args.out)
    check_video(args.video)
    model = check_model(args.model)
    _check_device(args)
    from statekv.store.cache_store import CacheStore  # no torch: a committed cache is skipped without it
    from statekv.store.errors import CacheNotFoundError

    store, video_id = CacheStore.of_cache(args.out, storage_options=_storage(args))
    settings = args.settings
    if args.resume:  # nothing to resume, or a flag that differs from the cache's: fail before loading the model
        from jobs.options import resume_settings

        settings = resume_settings(args, store.manifest(video_id), args.out)  # the cache's own settings
    elif not args.overwrite:
        try:
            committed = store.manifest(video_id)
        except CacheNotFoundError:
            committed = None
        if committed is not None:
            store.reconcile(video_id, committed)  # a kill may have lost its catalog entry
            _report_prefill(args, {**committed, "skipped": True}, time.perf_counter() - started)
            return 0

    engine = _engine(model, args, settings)
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="prefill", unit="chunk", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = store.prefill(engine, args.video, video_id, mode="overwrite" if args.overwrite else "skip",
                               int8=args.int8, resume=args.resume, progress=progress, backend=args.backend)
    finally:
        if bar is not None:
            bar.close()
    _report_prefill(args, result, time.perf_counter() - started)
    return 0


def _report_prefill(args: argparse.Namespace, manifest: dict[str, Any], seconds: float) -> None:
    if not args.json:
        print(_describe(manifest))
        return
    _print_json({"uri": args.out, "video_id": manifest["video_id"], "skipped": bool(manifest.get("skipped")),
                 "seconds": round(seconds, 3), "totals": manifest["totals"], "model": manifest["model"],
                 "policy": manifest["prefill"]["policy"], "prefill": manifest["prefill"],
                     "storage": manifest["storage"]})


def cmd_ask_service(args: argparse.Namespace) -> int:
    """`statekv ask --service URL VIDEO_ID QUESTION...`: the same output, answered by a running query service (one
    request per question, in order)."""
    from pipelines.serving import client

    body: dict[str, Any] = {"video_id": args.uri, "max_new_tokens": args.max_new_tokens,
                            "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        body["seed"] = args.seed
    retrieval = {k: v for k, v in (("top_k", args.top_k), ("segments", args.segments), ("recent", args.recent),
                                   ("query", args.query)) if v is not None}
    if args.adaptive:
        retrieval["adaptive"] = True
    if retrieval:
        body["retrieval"] = retrieval
    if args.stream:
        for event in client.stream(args.service, {**body, "question": args.questions[0]}):
            if event["type"] == "token":
                print(event["text"], end="", flush=True)
            elif event["type"] == "done" and event.get("evidence"):
                print()
                print(_format_evidence([argparse.Namespace(**e) for e in event["evidence"]]), end="")
        print()
        return 0
    for question in args.questions:
        answer = client.ask(args.service, {**body, "question": question})
        evidence = [argparse.Namespace(**e) for e in answer["evidence"]] if answer.get("evidence") else None
        _print_answer(args, question, answer["answer"], answer, evidence)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if args.service:
        return cmd_ask_service(args)
    from jobs.checks import check_model
    from statekv.store.cache_store import CacheStore

    store, video_id = CacheStore.of_cache(args.uri, storage_options=_storage(args))
    start = time.perf_counter()
    cache = store.load(video_id)  # lazy (retrieval reads only the chosen chunks); its manifest names the model
    load_cache_s = time.perf_counter() - start
    manifest = cache.committed.manifest
    model = check_model(args.model or manifest["model"]["name_or_path"])
    _check_device(args)
    start = time.perf_counter()
    engine = _engine(model, args)
    load_model_s = time.perf_counter() - start
    retrieval = _retrieval(args)  # the lazily loaded cache then reads only the chosen chunks
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)
    if args.stream:
        evidence: list[Any] = []
        for event in engine.stream(cache, args.questions[0], evidence=evidence, retrieval=retrieval, **options):
            print(event.text, end="", flush=True)
        print()
        if retrieval is not None:
            print(_format_evidence(evidence))
        return 0
    if retrieval is None:  # the questions share the video's KV: one batch, one forward per step
        from statekv import AnswerRequest

        answers = engine.ask_many(cache, [AnswerRequest(q, **options) for q in args.questions])
    else:  # each question reads its own chunks
        answers = [engine.ask(cache, q, retrieval=retrieval, **options) for q in args.questions]
    timings = {"load_model_s": round(load_model_s, 4), "load_cache_s": round(load_cache_s, 4)}
    for question, answer in zip(args.questions, answers):
        report = _answer_report(args.uri, question, answer, manifest, cache, retrieval, model, timings) \
            if args.json else None
        _print_answer(args, question, answer.text, report, None if retrieval is None else answer.evidence)
    return 0


def _print_answer(args: argparse.Namespace, question: str, text: str, report: dict[str, Any] | None,
                  evidence: list[Any] | None) -> None:
    """One answer of `ask`, answered here or by a service: its JSON object with --json (one line each when there
    are several questions), else its text (`Q:`/`A:` when several) and the evidence when there is some to show."""
    several = len(args.questions) > 1
    if args.json:
        print(json.dumps(report, default=str) if several else json.dumps(report, indent=2, default=str))
        return
    print(f"Q: {question}\nA: {text}" if several else text)
    if evidence is not None:
        print(_format_evidence(evidence))


def _answer_report(uri: str, question: str, answer: Any, manifest: dict[str, Any], cache: Any, retrieval: Any,
                   model: str, timings: dict[str, float]) -> dict[str, Any]:
    """`ask --json`'s object for one answer."""
    from dataclasses import asdict

    video_tokens = manifest["totals"]["tokens"] if retrieval is None else \
        sum(cache.chunk_tokens[e.chunk] for e in answer.evidence)
    return {
        "uri": uri, "question": question, "answer": answer.text, "finish_reason": answer.finish_reason,
        "token_ids": answer.token_ids, "prompt_ids": answer.prompt_ids,
        "tokens": {"prompt": len(answer.prompt_ids), "context": manifest["prefix_len"] + video_tokens,
                   "generated": len(answer.token_ids)},
        "timings": {**timings, "first_token_s": round(answer.first_token_s, 4), "total_s": round(answer.total_s, 4)},
        "model": model,
        "retrieval": None if retrieval is None else retrieval.settings(),
        "evidence": None if retrieval is None else [asdict(e) for e in answer.evidence],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from statekv.store.cache_store import CacheStore
    from statekv.store.describe import format_manifest

    store, video_id = CacheStore.of_cache(args.uri, storage_options=_storage(args))
    manifest = store.manifest(video_id)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(args.uri, manifest))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.checks import check_root

    storage = _storage(args)
    check_root(args.root, storage)
    from statekv.store.cache_store import CacheStore
    from statekv.store.describe import human_bytes

    entries = CacheStore(args.root, storage_options=storage).list()
    if args.json:
        _print_json({"root": args.root, "caches": [asdict(e) for e in entries]})
        return 0
    for entry in entries:
        print(f"{entry.video_id}\t{human_bytes(entry.bytes)}\t{entry.uri}")
    print(f"{len(entries)} committed cache(s) under {args.root}", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from jobs import index_videos
    from jobs.checks import check_index_input, check_model

    check_index_input(args.input, _storage(args))  # before a Ray cluster starts
    args.model = check_model(args.model)  # a local directory, absolute: what the caches record
    return index_videos.run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from jobs import serve
    from jobs.checks import check_model

    args.model = check_model(args.model)  # before a Ray cluster starts
    return serve.run(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from pipelines.serving.keys import add_key, remove_key

    if args.keys_command == "revoke":
        remove_key(args.file, args.key_id)
        print(f"statekv keys: revoked {args.key_id!r} in {args.file}", file=sys.stderr)
        return 0
    secret = add_key(args.file, args.key_id, prefixes=[""] if args.all_videos else args.prefix, roots=args.root,
                     can_list=args.can_list, note=args.note)
    print(secret)
    print(f"statekv keys: added {args.key_id!r} to {args.file}; the secret above is shown only now: clients send "
          "`Authorization: Bearer <secret>`", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jobs import eval as eval_job
    from jobs.checks import quiet_transformers

    _check_device(args)  # the model was checked with the flags (before torch loads)
    quiet_transformers()
    return eval_job.run(args)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statekv.testing.checkpoints import TINY_CHECKPOINTS

    if args.list or not args.family:
        print("\n".join(TINY_CHECKPOINTS))
        if not args.list:
            print("statekv tiny-model: give FAMILY and DIR, e.g. `statekv tiny-model qwen2_vl ./tiny-qwen2vl`",
                  file=sys.stderr)
        return 0 if args.list else EXIT_USAGE
    if args.family not in TINY_CHECKPOINTS:
        raise ValueError(f"family {args.family!r} is not known; families: {', '.join(TINY_CHECKPOINTS)}")
    if not args.dir:
        raise ValueError("give the folder to write, e.g. `statekv tiny-model qwen2_vl ./tiny-qwen2vl`")
    path = Path(args.dir).expanduser()
    if (path / "config.json").exists():
        raise FileExistsError(f"{args.dir!r}: holds a checkpoint already (config.json); choose another folder")
    from jobs.checks import quiet_transformers
    from statekv.testing.checkpoints import save_tiny_checkpoint

    quiet_transformers()
    save_tiny_checkpoint(path, args.family, seed=args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {path.resolve()} (random weights: answers are noise)")
    print(f"try: statekv prefill VIDEO --model {args.dir} --out caches/VIDEO_ID")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from statekv import proxy, samples
    from statekv.retrieval import TopK
    from statekv.settings import PrefillSettings
    from statekv.store.cache_store import CacheStore
    from statekv.store.describe import format_manifest

    _check_device(args)
    model = args.model or str(proxy.checkpoint_path())
    truth = None
    if args.video:
        video = args.video
    else:
        path, truth = samples.proxy_video()
        video = str(path)
    question = args.question or (truth.questions["shape"].text if truth else "What happens in the video?")
    expected = next((q for q in truth.questions.values() if q.text == question), None) if truth else None
    store = CacheStore(args.out or str(samples.DEFAULT_HOME / "caches"))
    uri = store.uri("sample")
    engine = _engine(model, argparse.Namespace(device=args.device, dtype=None, threads=args.threads),
                     PrefillSettings(capacity=args.capacity))
    start = time.perf_counter()
    store.prefill(engine, video, "sample", mode="overwrite")
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    cache = store.load("sample")
    answer = engine.ask(cache, question, max_new_tokens=24)
    answer_s = time.perf_counter() - start
    located = engine.ask(cache, question, max_new_tokens=1, retrieval=TopK(k=args.evidence_chunks))
    print(format_manifest(uri, cache.committed.manifest))
    print(f"prefill + store: {prefill_s:.2f} s; load + answer: {answer_s:.2f} s")
    if truth is not None:
        print(f"video:    {video} ({truth.num_chunks * 2 / truth.fps:g} s, 2 fps, lossless: open it to check)\n"
              f"          {truth.describe()}")
    print(f"question: {question}")
    verdict = ""
    if expected is not None:
        right = answer.text.strip().lower().strip(".") == expected.answer
        verdict = f"  ({'right' if right else 'WRONG'}: the video says {expected.answer!r})"
    print(f"answer:   {answer.text!r}{verdict}")
    # the chunks most layers pick first: where the question finds its evidence, in the video's time
    evidence = sorted(located.evidence, key=lambda e: (-e.layers, e.chunk))
    chunks = _format_evidence(evidence).split("\n", 1)[1]  # the chunk lines, without their header
    print(f"evidence: the chunks whose stored summary keys the question scores highest (ReKV's TopK, k="
          f"{args.evidence_chunks} per layer; 'layers': how many of the model's layers picked it):\n{chunks}")
    if not args.model:
        other = truth.questions["after"].text if truth else "What moves?"
        print("\nThe model is statekv's proxy (a 0.8 M-parameter Qwen2-VL trained here on synthetic videos of colours "
              "and shapes, statekv/proxy; python -m jobs.train_proxy retrains it). With every token kept it answers "
              "the six question types of held-out 16-48-frame videos right 90-100 % of the time (docs/benchmarks.md). "
              "Next:\n"
              f"  statekv inspect {uri}\n"
              f"  statekv ask {uri} \"{question}\" --json\n"
              f"  statekv ask {uri} \"{other}\"   # another question type\n"
              "  statekv prefill your.mp4 --model Qwen/Qwen2-VL-2B-Instruct --out caches/your   "
              "# a real model (from the hub)\n"
              "  statekv tiny-model --list   # tiny random checkpoints of every family, to try offline")
    return 0


def _describe(manifest: dict[str, Any]) -> str:
    from statekv.store.describe import human_bytes

    if manifest.get("skipped"):
        return (f"skipped: a committed cache already exists for {manifest['video_id']} "
                "(--overwrite redoes it, --resume appends to it)")
    totals = manifest["totals"]
    return (f"committed {manifest['video_id']}: {totals['chunks']} chunks, {totals['tokens']} video tokens, "
            f"{human_bytes(totals['bytes'])}")


if __name__ == "__main__":
    sys.exit(main())
