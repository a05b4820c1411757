"""The installed transformers processors, text side only: how a family's own processor lays a video into the text.

A family's processor decides which tokens stand for a video: it replaces the chat template's video placeholder
(`replace_video_token`: per-frame text, timestamps, pads) and may consume text around it
(`get_text_with_replacements`: Qwen3-VL's processor drops the template's `<|vision_start|>…<|vision_end|>`
wrapper in transformers 5.25). Adapters take that text from the installed processor instead of a copy wherever
they can, so an upstream layout change either moves statekv with it or fails the family tests, never silently.

The processors' classes insist on their image and video processors, whose kernels need torchvision; the text
side reads at most a few sizes of them. `text_only` builds the installed processor class without that check.
"""

from __future__ import annotations

from typing import Any

_TEXT_ONLY: dict[type, type] = {}
VIDEO_MARK = "\x00statekv-video\x00"  # stands for the video in a text given to the processor (never in a template)


def text_only(processor_cls: type, tokenizer: Any, **kwargs: Any) -> Any:
    """An instance of the installed `processor_cls` over `tokenizer` for its text side: `kwargs` give the image /
    video processors (None, or objects with the sizes its text expansion reads) and any other constructor
    arguments; the class check on them (which needs torchvision) is skipped."""
    cls = _TEXT_ONLY.get(processor_cls)
    if cls is None:
        cls = type(f"TextOnly{processor_cls.__name__}", (processor_cls,),
                   {"check_argument_for_proper_class": lambda self, name, argument: type(argument),
                    "__doc__": f"`{processor_cls.__name__}`, text side only (statekv.models.processor_text)."})
        _TEXT_ONLY[processor_cls] = cls
    kwargs.setdefault("image_processor", None)
    kwargs.setdefault("video_processor", None)
    return cls(tokenizer=tokenizer, chat_template=getattr(tokenizer, "chat_template", None), **kwargs)


def put_video(processor: Any, text: str, replacement: str) -> str:
    """`text` with its one video placeholder replaced by `replacement`, as the processor does it (including any
    text around the placeholder that the processor consumes). ValueError unless `text` holds one video."""
    out, _ = processor.get_text_with_replacements([text], videos_replacements=[replacement])
    expanded = out[0]
    if replacement == VIDEO_MARK and expanded.count(VIDEO_MARK) != 1:
        raise ValueError(f"the processor placed {expanded.count(VIDEO_MARK)} videos in a text with one video part")
    return expanded


def around_video(processor: Any, text: str) -> tuple[str, str]:
    """(text before the video, text after it) once the processor has put a video into `text`."""
    before, after = put_video(processor, text, VIDEO_MARK).split(VIDEO_MARK)
    return before, after
