"""Prefill a video with StateKV and answer a question: `python -m jobs.demo [--model M] [--video V]`.

With no arguments it uses the embedded defaults (a tiny random Qwen2-VL and a synthetic sample video).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import statekv
from statekv import samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory or hub id (default: a tiny random Qwen2-VL)")
    parser.add_argument("--video", help="video path or URL (default: a synthetic sample video)")
    parser.add_argument("--question", default="What happens in the video?")
    parser.add_argument("--capacity", type=int, default=4096, help="carried-state capacity (tokens per layer)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = args.model or str(samples.tiny_checkpoint())
    video = args.video or str(samples.sample_video())
    engine = statekv.Engine.from_pretrained(model, policy=statekv.StateKV(capacity=args.capacity),
                                            device=args.device, sampling=statekv.SamplingConfig(fps=args.fps))
    start = time.perf_counter()
    cache = engine.prefill(video)
    prefill_s = time.perf_counter() - start
    answer = engine.ask(cache, args.question, max_new_tokens=args.max_new_tokens)
    print(f"model:    {model}")
    print(f"video:    {video} ({len(cache.video.frame_indices)} frames sampled at {cache.video.sampled_fps:.2f} fps)")
    print(f"cache:    {cache.grid_t} chunks, {cache.num_video_tokens} video tokens, "
          f"state {cache.state_sizes()} tokens per layer, {cache.nbytes / 1e6:.2f} MB")
    print(f"prefill:  {prefill_s:.2f} s; answer: {answer.total_s:.2f} s ({len(answer.token_ids)} tokens)")
    print(f"question: {args.question}")
    print(f"answer:   {answer.text!r}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
