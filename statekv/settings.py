"""`PrefillSettings`: every setting of a prefill, defined once.

The engine is built from it (`Engine.from_settings`), the command line's flags are generated from it
(`add_cli_args`: `statekv prefill` and `statekv index` take the same flags, with the same names, help and
defaults), the indexing job's config embeds it (`IndexConfig.prefill`), and a cache records it: the engine writes
its resolved form (`statekv.cache.PrefillConfig`: the policy's settings, the sampling, the adapter's options) into
the manifest, and `from_record` reads it back, so that `Engine.from_settings(model, from_record(recorded))` makes
caches with exactly that record (what a resume continues with).

vLLM's `EngineArgs` is the model: a plain dataclass whose fields carry their command-line help. This module imports
no torch, so building a parser (`--help`) stays cheap; the names below are spelled out for the same reason (a test
keeps them equal to statekv.policies.POLICIES, statekv.cache.ANSWER_FROM and statekv.models.base.LAYOUTS).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

POLICY_NAMES = ("full", "window", "statekv", "infinipot", "infinipot-stream")
BUDGETED = ("infinipot", "infinipot-stream")  # policies whose size is `budget` (statekv.policies.BUDGETED)
ANSWER_FROM = ("chunks", "state")
LAYOUT_NAMES = ("prefix-first", "video-first")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DEFAULT_GUIDANCE_PROMPT = "What is happening in this video?"  # statekv.compression.Guided's default prompt


def _setting(default: Any, help: str, *, flag: bool = True, recorded: bool = True, **argparse_kwargs: Any) -> Any:
    """A field of `PrefillSettings`: its default, its flag's help (None: no flag), and whether caches record it."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "flag": flag, "recorded": recorded, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class PrefillSettings:
    """What a prefill does besides the model and the video. Every field but `vision_batch_frames` is recorded with
    the cache (a resume refuses to change it)."""

    policy: str = _setting("statekv", "carried-state policy", choices=POLICY_NAMES)
    capacity: int | None = _setting(4096, "carried tokens per layer and KV head (statekv, window; the memory "
                                    "budget of infinipot and infinipot-stream); full takes none", type=int)
    policy_options: dict[str, Any] = _setting(dict, "the policy's other settings (StateKV's decay, InfiniPot-V's "
                                              "target, recent share and TaR weight)", flag=False)
    answer_from: str = _setting("chunks", "what the cache stores and answers from: every chunk's KV (chunks) or only "
                                "the bounded carried state (state: with --policy infinipot, bytes that do not grow "
                                "with the video)", choices=ANSWER_FROM)
    compress_keep: float | None = _setting(None, "StreamKV write-time compression: each chunk stores only this "
                                           "fraction of its tokens per layer, those the guidance prompt attends to "
                                           "most (default: store every token)", type=float, metavar="FRACTION")
    guidance_prompt: str | None = _setting(None, "the guidance prompt of --compress-keep (default: "
                                           f"{DEFAULT_GUIDANCE_PROMPT!r})", metavar="TEXT")
    fps: float = _setting(2.0, "frames sampled per second of video", type=float)
    min_frames: int = _setting(4, "fewer sampled frames only when the video itself is shorter", flag=False)
    max_frames: int | None = _setting(None, "cap on sampled frames per video (default: no cap); a cap that lowers "
                                      "the fps of a long video is warned about, and the manifest records requested "
                                      "and sampled fps", type=int, metavar="N")
    min_pixels: int | None = _setting(None, "minimum pixels per frame after resizing (default: the checkpoint's)",
                                      type=int, metavar="N")
    max_pixels: int | None = _setting(None, "maximum pixels per frame after resizing (default: the checkpoint's)",
                                      type=int, metavar="N")
    chunks_per_step: int = _setting(1, "chunks per model call; with k > 1 the chunks of a step attend to each other "
                                    "in full and the policy selects once per step, so statekv/window results differ "
                                    "from k = 1 (full does not)", type=int, metavar="K")
    layout: str = _setting("prefix-first", "where the chat text before the video goes: prefix-first (the model's own "
                           "chat format) or video-first (the StateKV paper's: every chunk attends to the video-open "
                           "token, the carried state and itself)", choices=LAYOUT_NAMES)
    attention_backend: str = _setting("auto", "attention kernels (auto: Triton on CUDA when it applies)",
                                      choices=ATTENTION_BACKENDS)
    adapter_options: dict[str, Any] = _setting(dict, "the family adapter's options (position rule, RoPE scaling)",
                                               flag=False)
    vision_batch_frames: int = _setting(16, "frames the vision tower encodes per call, in whole steps (at least one "
                                        "step): fewer calls, while host memory holds N decoded frames and their "
                                        "pixels; the features equal per-step encoding within float rounding. Not "
                                        "recorded: a resume may use another value", recorded=False, type=int,
                                        metavar="N")

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        """Why these settings cannot make a cache (naming the setting as its flag), or None."""
        if self.policy not in POLICY_NAMES:
            return f"--policy: unknown policy {self.policy!r}; valid: {', '.join(POLICY_NAMES)}"
        for name in ("capacity", "chunks_per_step", "vision_batch_frames", "min_frames"):
            value = getattr(self, name)
            if name == "capacity" and value is None and self.policy == "full":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"--{_dashed(name)} must be a positive integer, got {value!r}"
        for name in ("max_frames", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                return f"--{_dashed(name)} must be a positive integer, got {value!r}"
        if not isinstance(self.fps, (int, float)) or not math.isfinite(self.fps) or self.fps <= 0:
            return f"--fps must be a positive number, got {self.fps!r}"
        if self.answer_from not in ANSWER_FROM:
            return f"--answer-from: unknown value {self.answer_from!r}; valid: {', '.join(ANSWER_FROM)}"
        if self.layout not in LAYOUT_NAMES:
            return f"--layout: unknown layout {self.layout!r}; valid: {', '.join(LAYOUT_NAMES)}"
        if self.attention_backend not in ATTENTION_BACKENDS:
            return (f"--attention-backend: unknown backend {self.attention_backend!r}; valid: "
                    f"{', '.join(ATTENTION_BACKENDS)}")
        if self.compress_keep is None:
            if self.guidance_prompt is not None:
                return "--guidance-prompt needs --compress-keep (the fraction of tokens each chunk stores)"
            return None
        if not 0.0 < self.compress_keep <= 1.0:
            return f"--compress-keep must be a fraction in (0, 1], got {self.compress_keep}"
        if self.guidance_prompt is not None and not self.guidance_prompt.strip():
            return "--guidance-prompt must not be empty"
        if self.answer_from == "state":
            return "--compress-keep shrinks the stored chunks, and --answer-from state stores none"
        return None

    # --- what the engine makes of them -----------------------------------------------------------------------

    @property
    def compression(self) -> dict[str, Any] | None:
        """The write-time compression settings (`statekv.compression.make_compression`), None: store every token."""
        if self.compress_keep is None:
            return None
        out: dict[str, Any] = {"name": "guided", "keep": self.compress_keep}
        if self.guidance_prompt is not None:
            out["prompt"] = self.guidance_prompt
        return out

    @property
    def policy_settings(self) -> dict[str, Any]:
        """The policy's settings as `statekv.policies.make_policy` takes them (its size is InfiniPot-V's
        `budget`, the others' `capacity`; `full` has none)."""
        if self.policy == "full":
            return dict(self.policy_options)
        size = "budget" if self.policy in BUDGETED else "capacity"
        return {size: self.capacity, **self.policy_options}

    @property
    def sampling(self) -> dict[str, Any]:
        """`statekv.video.SamplingConfig` keyword arguments (pixel bounds None: the checkpoint's)."""
        return {"fps": self.fps, "min_frames": self.min_frames, "max_frames": self.max_frames,
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    # --- a cache's record -------------------------------------------------------------------------------------

    @classmethod
    def from_record(cls, prefill: dict[str, Any], **unrecorded: Any) -> "PrefillSettings":
        """The settings that made a cache, from its recorded prefill config (manifest["prefill"],
        `PrefillConfig.to_dict()`); `unrecorded` sets what caches do not record (`vision_batch_frames`)."""
        policy = dict(prefill["policy"])
        name = policy.pop("name")
        size = policy.pop("budget" if name in BUDGETED else "capacity", None)
        sampling = dict(prefill["sampling"])
        compression = dict(prefill.get("compression") or {})
        values = dict(policy=name, policy_options=policy, answer_from=prefill.get("answer_from", "chunks"),
                      compress_keep=compression.get("keep"), guidance_prompt=compression.get("prompt"),
                      fps=sampling["fps"], min_frames=sampling.get("min_frames", 4),
                      max_frames=sampling.get("max_frames"), min_pixels=sampling.get("min_pixels"),
                      max_pixels=sampling.get("max_pixels"), chunks_per_step=prefill["chunks_per_step"],
                      layout=prefill["layout"], attention_backend=prefill["attention_backend"],
                      adapter_options=dict(prefill.get("adapter") or {}))
        values["capacity"] = size  # None for full, which takes none
        return cls(**values, **unrecorded)

    # --- the command line ---------------------------------------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting (`--chunks-per-step` for `chunks_per_step`), its parser default None so that a
        command can tell a flag given from one left out (a resume takes what was left out from its cache)."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta["flag"]:
                continue
            help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {f.default})"
            parser.add_argument(f"--{_dashed(f.name)}", dest=f.name, default=None, help=help_text,
                                **meta["argparse"])

    @classmethod
    def given_flags(cls, args: argparse.Namespace) -> dict[str, Any]:
        """{field: value} of the setting flags given on the command line (those left out are None)."""
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if f.metadata["flag"] and getattr(args, f.name, None) is not None}

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "PrefillSettings":
        """The settings the flags ask for, defaults for those left out (ValueError naming a flag's bad value)."""
        return cls(**cls.given_flags(args))

    def resumed_with(self, given: dict[str, Any], where: str) -> "PrefillSettings":
        """These (a cache's recorded) settings, for a resume given the flags `given`: a recorded setting given with
        another value is refused (ValueError naming the flag, both values and the way out); unrecorded ones
        (`vision_batch_frames`) are taken as given."""
        for name, value in given.items():
            mine = getattr(self, name)
            if _recorded(name) and value != mine:
                flag = "--" + _dashed(name)
                shown = "(not set)" if mine is None else mine
                raise ValueError(f"{where}: {flag} {value} differs from the cache's {flag} {shown}; a resume "
                                 "continues with the settings the cache was made with (leave the flag out, or "
                                 "--overwrite to prefill anew)")
        return dataclasses.replace(self, **{k: v for k, v in given.items() if not _recorded(k)})


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _recorded(name: str) -> bool:
    """Whether caches record the setting `name` (a resume may not change it)."""
    return next(f for f in dataclasses.fields(PrefillSettings) if f.name == name).metadata["recorded"]
