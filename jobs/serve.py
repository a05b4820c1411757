"""Serve questions over stored caches over HTTP: a Ray Serve deployment on a local Ray cluster (blocks until Ctrl-C).

    statekv serve --caches s3://bucket/caches --model Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --num-gpus 1
    curl -s localhost:8000/v1/ask -H 'content-type: application/json' -d '{"video_id": "clip", "question": "..."}'

The same application is built from infra/serve/config.yaml by `serve run` / `serve deploy`
(import path `pipelines.serving.app:app_builder`).

Closed by default: without --api-keys the service answers loopback clients only and refuses to listen on another
address unless --no-auth says so; with --api-keys FILE (see `statekv keys new`) every /v1 request needs
`Authorization: Bearer <secret>`, and each key has its scope and limits.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register this command's flags on `parser`."""
    parser.add_argument("--caches", required=True, metavar="ROOT",
                        help="cache root: local directory or s3://bucket/prefix (only caches directly under it)")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id the caches were made with")
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP host (0.0.0.0 to listen on every interface: needs --api-keys or --no-auth)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (0 on CPU)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (each loads the model once)")
    parser.add_argument("--lru-bytes", type=int, default=4 << 30, help="host memory for loaded caches, per replica")
    parser.add_argument("--max-question-tokens", type=int, default=1024,
                        help="longest question in tokens, chat template included (longer: 413 naming the limit)")
    parser.add_argument("--max-question-chars", type=int, default=4000,
                        help="cheap bound on the question's characters, checked before tokenizing (longer: 422)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=512,
                        help="largest max_new_tokens accepted (the OpenAPI schema's maximum)")
    parser.add_argument("--revalidate-s", type=float, default=1.0,
                        help="seconds a loaded cache is served before its manifest is checked again (one HEAD); "
                             "a cache re-prefilled under its id is stale for at most this long (0: every request)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, a local S3 server, ...)")
    parser.add_argument("--region", help="S3 region (default: from the AWS environment)")
    access = parser.add_argument_group("access", "who may ask: API keys with scopes and per-key limits (per replica)")
    who = access.add_mutually_exclusive_group()
    who.add_argument("--api-keys", metavar="FILE",
                     help="key file (JSON; `statekv keys new` writes entries), re-read within ~1 s when it changes; "
                          "without it the service answers loopback clients only")
    who.add_argument("--no-auth", action="store_true",
                     help="check no keys and serve every client, on any --host (logged as a warning)")
    access.add_argument("--audit-questions", action="store_true",
                        help="also put the question text in the audit log lines (statekv.audit)")
    access.add_argument("--key-requests-per-s", metavar="R", type=float, default=5.0, help="requests per second per key")
    access.add_argument("--key-request-burst", metavar="N", type=float, default=20.0, help="requests at once per key")
    access.add_argument("--key-tokens-per-s", metavar="R", type=float, default=1000.0,
                        help="generated tokens per second per key")
    access.add_argument("--key-token-burst", metavar="N", type=float, default=8192.0, help="generated tokens at once per key")
    access.add_argument("--key-max-concurrent", metavar="N", type=int, default=4, help="requests in flight per key")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join, given this shell's AWS_* storage variables and Ray token (default: "
                             "start a local one)")


def config_from_args(args: argparse.Namespace):
    from pipelines.serving.config import ServiceConfig

    return ServiceConfig(
        model=args.model, caches_root=args.caches, endpoint_url=args.endpoint_url, region=args.region,
        device=args.device, dtype=args.dtype, lru_bytes=args.lru_bytes, max_question_chars=args.max_question_chars,
        max_question_tokens=args.max_question_tokens, max_new_tokens_limit=args.max_new_tokens_limit,
        revalidate_s=args.revalidate_s, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
        api_keys_file=os.path.abspath(args.api_keys) if args.api_keys else None, no_auth=args.no_auth,
        audit_questions=args.audit_questions, key_requests_per_s=args.key_requests_per_s,
        key_request_burst=args.key_request_burst, key_tokens_per_s=args.key_tokens_per_s,
        key_token_burst=args.key_token_burst, key_max_concurrent=args.key_max_concurrent,
        autoscaling={"min_replicas": args.replicas, "max_replicas": args.replicas, "target_ongoing_requests": 8})


def prepare(args: argparse.Namespace):
    """The service's config, after the checks that need no cluster: settings, the key file, the bind address."""
    from pipelines.serving.auth import check_bind
    from pipelines.serving.keys import load_key_file

    config = config_from_args(args)
    if config.api_keys_file:
        load_key_file(config.api_keys_file)  # KeyFileError: one line naming the file and the reason
    check_bind(args.host, keys_configured=bool(config.api_keys_file), no_auth=config.no_auth)
    return config


def start(args: argparse.Namespace, config) -> str:
    """Start Serve's HTTP proxy on --host/--port and deploy the service on the connected Ray cluster; its URL."""
    from ray import serve

    from pipelines.serving.app import build_app

    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="statekv", route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray
    from ray import serve

    from pipelines.cluster import init_ray

    config = prepare(args)  # bad settings, key files and binds fail here, before any cluster starts

    def stop(signum, frame):  # SIGTERM (kill, a container stop) shuts down like Ctrl-C
        raise KeyboardInterrupt

    init_ray(args.address, include_dashboard=False)  # joining: with this shell's storage credentials
    signal.signal(signal.SIGTERM, stop)  # after Ray's init, which installs its own SIGTERM handler (an abort)
    try:
        url = start(args, config)
        print(f"statekv serve: answering questions over {config.caches_root} with {config.model} at {url} "
              "(OpenAPI at /docs); Ctrl-C stops", file=sys.stderr, flush=True)
        threading.Event().wait()  # until Ctrl-C (KeyboardInterrupt)
    except KeyboardInterrupt:
        print("statekv serve: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        print(f"statekv serve: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
