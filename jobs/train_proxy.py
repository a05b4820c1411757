"""Train the proxy model: a tiny Qwen2-VL, from scratch, on the synthetic task of statekv/proxy/task.py.

    python -m jobs.train_proxy                       # the shipped checkpoint (statekv/proxy/weights/qwen2_vl)
    python -m jobs.train_proxy --out /tmp/p --steps 20 --hidden 32 --layers 1 --lengths 8   # a smoke run
    python -m jobs.train_proxy --init /tmp/stage1 --seed 1 --lr 1e-3 --out /tmp/stage2     # a further stage
    python -m jobs.train_proxy --steps 2400 --lengths 8,16,24,32,48,64,80,96,112,128 \
        --first-lengths 8,16,24,32,40,48 --first-steps 800 --out /tmp/long   # a length curriculum to 128 frames

The model is the real `Qwen2VLForConditionalGeneration` fed what the processor builds
(`statekv.testing.reference_inputs`: the chat template around the video, M-RoPE positions as the model computes
them), so `Engine.from_pretrained` loads the result like any checkpoint and `Full()` answers as it does. Each
training row holds one video and every question type about it: the video once, then one block per question that
sees the video and itself only, at the positions it would have right after the video (each block's logits are
those of the one-question sequence; tested), so a step's one vision pass carries six answers. Besides the answer
loss, two linear heads give dense targets (auxiliary losses, dropped after training): one on the vision merger's
output learns each video token's colour and shape (without it the tiny model learned nothing in minutes; it reads
layer-normed tokens, since on raw ones it drove the tokens' norm up instead), one on the language model's video
tokens before its last layer learns what "count", "after" and "repeat" need from the chunks so far (shapes seen,
first chunk after the first shape, colour seen in an earlier segment; without it those stayed near chance).
Deterministic given --seed (data seeds, init and batch order all come from it; fixed --steps, not a time budget)
and, for a further stage, --init (the earlier stage's record is kept).
Writes the checkpoint with `save_pretrained`, a `training.json` (script, seed, steps, wall time, machine, held-out
accuracy per question type and length through statekv's `Full()` and the plain model) and, with --plot, a PNG of
loss and accuracy against steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "statekv" / "proxy" / "weights" / "qwen2_vl"


def proxy_corpus() -> list[str]:
    """Text the tokenizer is trained on: the questions, and each answer word often enough to be one token."""
    from statekv.proxy.task import ANSWER_WORDS, QUESTIONS

    words = [w for w in ANSWER_WORDS for _ in range(50)]
    return [*QUESTIONS.values(), "You are a helpful assistant. system user assistant", *words,
            " ".join(ANSWER_WORDS)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_proxy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the data and the batch order")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from this checkpoint (an earlier stage's --out; its record is kept in ours)")
    p.add_argument("--steps", type=int, default=2600, help="optimiser steps")
    p.add_argument("--batch", type=int, default=8, help="videos per step (each asked every question type, in one row)")
    p.add_argument("--lengths", default="8,16,24,32,40,48",
                   help="video lengths (frames, comma-separated) trained on, drawn uniformly per step")
    p.add_argument("--first-lengths", default=None,
                   help="a length curriculum: the lengths drawn during the first --first-steps steps (e.g. the short "
                   "ones, cheaper per step), --lengths after them; one learning-rate schedule over all steps")
    p.add_argument("--first-steps", type=int, default=0, help="steps drawn from --first-lengths")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-token vision loss")
    p.add_argument("--state-weight", type=float, default=0.5,
                   help="weight of the per-token loss on the language model's video tokens (input of its last layer): "
                   "shapes seen so far, first chunk after the first shape, colour seen in an earlier segment")
    p.add_argument("--feature-penalty", type=float, default=1e-3,
                   help="weight of the mean square of the vision tokens (keeps them at the text embeddings' scale)")
    p.add_argument("--hidden", type=int, default=128, help="text hidden size")
    p.add_argument("--layers", type=int, default=3, help="text decoder layers")
    p.add_argument("--vision-depth", type=int, default=2, help="vision tower blocks")
    p.add_argument("--vision-dim", type=int, default=64, help="vision tower width")
    p.add_argument("--vocab", type=int, default=400, help="tokenizer vocabulary size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran 7x slower per step once "
                   "another process took a core, 1 thread only 1.2x)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out first-token checks")
    p.add_argument("--eval-lengths", default=None, help="lengths of the final evaluation (default: --lengths' "
                   "longest, middle and shortest)")
    p.add_argument("--eval-videos", type=int, default=20, help="held-out videos per length in the final evaluation")
    p.add_argument("--plot", type=Path, default=None, help="write the loss / accuracy curves to this PNG "
                   "(needs matplotlib)")
    return p


def _lengths(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class Batches:
    """Training batches: videos drawn from seeds below the held-out range, laid out as the processor does.

    `draw` puts several questions about one video into one row (`collate_questions`): the video once, then each
    question's text and answer as a block that sees the video and itself only, at the positions it would have
    right after the video. So one vision pass and one video prefix carry every question type's answer loss; the
    logits of a block are those of the processor's one-question sequence (tests/jobs/test_train_proxy.py).
    `draw_single` gives the processor's own one-question rows (the held-out check)."""

    def __init__(self, adapter: Any, lengths: list[int], batch: int, seed: int) -> None:
        import numpy as np

        from statekv.proxy.task import FPS, FRAME_SIZE, QUESTION_TYPES

        self.adapter, self.lengths, self.batch = adapter, lengths, batch
        self.rng = np.random.default_rng(seed)
        self.types = QUESTION_TYPES
        self.fps, self.size = FPS, (FRAME_SIZE, FRAME_SIZE)
        self.eos = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = adapter.tokenizer.pad_token_id
        self._after: dict[str, list[int]] = {}  # question text -> the template's ids after the video

    def after_video(self, question: str) -> list[int]:
        """The chat template's ids after the video for `question` (rendered once per question)."""
        if question not in self._after:
            self._after[question] = self.adapter.split_template(question)[1]
        return self._after[question]

    def example(self, video: Any, qtype: str) -> dict[str, Any]:
        """The processor's sequence for `video` and one question, its answer appended; labels on the answer."""
        from statekv.testing.reference_inputs import reference_inputs

        q = video.questions[qtype]
        inputs = reference_inputs(self.adapter, video.frames, q.text, "prefix-first", self.size, self.fps)
        answer = self.adapter.text_ids(q.answer) + [self.eos]
        ids = inputs["input_ids"][0].tolist() + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        return {"ids": ids, "labels": labels, "pixels": inputs["pixel_values_videos"],
                "grid": inputs["video_grid_thw"], "video": video, "types": [qtype]}

    def questions_example(self, video: Any, qtypes: list[str]) -> dict[str, Any]:
        """`video` once, then one block per question type (its text after the video, its answer): see the class."""
        import torch

        first = self.example(video, qtypes[0])
        answer_len = sum(x != -100 for x in first["labels"])
        after = self.after_video(video.questions[qtypes[0]].text)
        shared = len(first["ids"]) - answer_len - len(after)  # the template before the video, and the video
        ids = torch.tensor([first["ids"]])
        positions, _ = self.adapter.model.model.get_rope_index(  # (3, 1, L): as the model computes them
            ids, mm_token_type_ids=(ids == self.adapter.video_token_id).long() * 2, video_grid_thw=first["grid"])
        after_video = int(positions[0, 0, shared])  # text after the video: one position on all three axes
        all_ids, labels, segment = first["ids"][:shared], [-100] * shared, [0] * shared
        pos = [positions[:, 0, :shared]]
        for i, t in enumerate(qtypes, start=1):
            q = video.questions[t]
            text = self.after_video(q.text)
            answer = self.adapter.text_ids(q.answer) + [self.eos]
            block = text + answer
            all_ids += block
            labels += [-100] * len(text) + answer
            segment += [i] * len(block)
            pos.append((after_video + torch.arange(len(block))).expand(3, -1))
        return {"ids": all_ids, "labels": labels, "segment": segment, "positions": torch.cat(pos, dim=1),
                "pixels": first["pixels"], "grid": first["grid"], "video": video, "types": list(qtypes)}

    def _videos(self, length: int | None, jitter: float, noise: float, seeds: list[int] | None) -> list[Any]:
        from statekv.proxy.task import make_video

        length = length or int(self.rng.choice(self.lengths))
        seeds = seeds or [int(s) for s in self.rng.integers(0, 1_000_000, size=self.batch)]
        return [make_video(length, s, jitter=jitter, noise=noise) for s in seeds]

    def draw(self, *, length: int | None = None, jitter: float = 6.0, noise: float = 2.0,
             seeds: list[int] | None = None, types: list[str] | None = None) -> dict[str, Any]:
        """One batch: random (or the given) length and seeds, every question type (or `types`) on each video."""
        videos = self._videos(length, jitter, noise, seeds)
        return collate_questions([self.questions_example(v, list(types or self.types)) for v in videos], self.pad,
                                 self.adapter.video_token_id)

    def draw_single(self, *, length: int, seeds: list[int], types: list[str], jitter: float = 0.0,
                    noise: float = 0.0) -> dict[str, Any]:
        """The processor's one-question rows: video `i` (seed `seeds[i]`) with question `types[i]`."""
        videos = self._videos(length, jitter, noise, seeds)
        return collate([self.example(v, t) for v, t in zip(videos, types)], self.pad, self.adapter.video_token_id)


def _token_targets(examples: list[dict[str, Any]], ids: Any, video_token_id: int) -> tuple[Any, Any]:
    """Per video token of the batch (in the merger's order): its chunk's colour and shape (the aux head's targets)."""
    import numpy as np
    import torch

    from statekv.proxy.task import token_labels

    colours, shapes = [], []
    for i, e in enumerate(examples):
        tokens = int((ids[i] == video_token_id).sum())
        c, s = token_labels(e["video"], tokens // e["video"].num_chunks)
        colours.append(c)
        shapes.append(s)
    return torch.from_numpy(np.concatenate(colours)), torch.from_numpy(np.concatenate(shapes))


def state_labels(video: Any, tokens_per_chunk: int) -> tuple[Any, Any, Any]:
    """Per video token (chunk-major): shapes seen up to its chunk (0-3), whether its chunk is the first after the first
    shape, whether its chunk's colour filled an earlier segment: what "count", "after" and "repeat" read, each
    computable from the chunk and those before it (targets of the training's language-model state head)."""
    import numpy as np

    n = video.num_chunks
    seen = np.cumsum([c in video.needles for c in range(n)])
    after = np.arange(n) == video.needles[0] + 1
    back, colour = video.repeat_segments[1], video.chunk_colours[video.repeat_segments[1]]
    again = np.zeros(n, dtype=bool)
    c = back
    while c < n and video.chunk_colours[c] == colour:  # the segment that brings the colour back
        again[c] = True
        c += 1
    return tuple(np.repeat(x.astype(np.int64), tokens_per_chunk) for x in (seen, after, again))


def collate(examples: list[dict[str, Any]], pad: int, video_token_id: int) -> dict[str, Any]:
    """Right-pad one-question examples into one batch of the model's inputs (positions left to the model), plus
    labels, the question types and the per-token vision targets."""
    import torch

    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        ids[i, :n] = torch.tensor(e["ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    colour, shape = _token_targets(examples, ids, video_token_id)
    return {"inputs": {"input_ids": ids, "attention_mask": mask,
                       "pixel_values_videos": torch.cat([e["pixels"] for e in examples]),
                       "video_grid_thw": torch.cat([e["grid"] for e in examples]),
                       "mm_token_type_ids": (ids == video_token_id).long() * 2},
            "labels": labels, "types": [t for e in examples for t in e["types"]], "colour": colour, "shape": shape}


def collate_questions(examples: list[dict[str, Any]], pad: int, video_token_id: int) -> dict[str, Any]:
    """Right-pad `questions_example` rows into one batch: explicit M-RoPE positions and a 4-D additive mask in
    which a token sees the earlier tokens of the shared video prefix and of its own block (padding sees itself)."""
    import numpy as np
    import torch

    width = max(len(e["ids"]) for e in examples)
    n_rows = len(examples)
    ids = torch.full((n_rows, width), pad, dtype=torch.long)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)
    positions = torch.zeros((3, n_rows, width), dtype=torch.long)  # (3, B, L): temporal, height, width
    segment = torch.full((n_rows, width), -1, dtype=torch.long)  # 0: shared prefix, i: question block i, -1: pad
    for i, e in enumerate(examples):
        n = len(e["ids"])
        ids[i, :n] = torch.tensor(e["ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        positions[:, i, :n] = e["positions"]
        segment[i, :n] = torch.tensor(e["segment"])
    q, k = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q)) | torch.eye(width, dtype=torch.bool)  # (B, L, L)
    mask = torch.zeros((n_rows, 1, width, width))  # (B, 1, L, L) additive
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask.dtype).min)
    colour, shape = _token_targets(examples, ids, video_token_id)
    per_chunk = [int((ids[i] == video_token_id).sum()) // e["video"].num_chunks for i, e in enumerate(examples)]
    state = [torch.from_numpy(np.concatenate(x)) for x in zip(*[state_labels(e["video"], k)
                                                                 for e, k in zip(examples, per_chunk)])]
    return {"state": state, "inputs": {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                       "pixel_values_videos": torch.cat([e["pixels"] for e in examples]),
                       "video_grid_thw": torch.cat([e["grid"] for e in examples])},
            "labels": labels, "types": [t for e in examples for t in e["types"]], "colour": colour, "shape": shape}


def build_model(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, Any]:
    """A fresh Qwen2-VL of the requested size with the proxy tokenizer (or, with --init, an earlier stage's
    checkpoint), its tokenizer and preprocessor written to `workdir` so the adapter sees exactly what a loaded
    checkpoint gives it."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from statekv.models import ADAPTERS
    from statekv.proxy.task import ANSWER_WORDS, FRAME_SIZE
    from statekv.testing.checkpoints import build_tokenizer, preprocessor_config, tiny_config

    tokenizer = build_tokenizer(args.vocab, corpus=proxy_corpus())
    long_answers = [w for w in ANSWER_WORDS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if long_answers:
        raise SystemExit(f"answers {long_answers} are more than one token at --vocab {args.vocab}; raise it")
    torch.manual_seed(args.seed)
    if args.init is not None:  # a further stage: same tokenizer and size, weights of the earlier stage
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        config = tiny_config("qwen2_vl", tokenizer, hidden_size=args.hidden, num_layers=args.layers,
                             vision_depth=args.vision_depth, vision_dim=args.vision_dim)
        model = Qwen2VLForConditionalGeneration(config)
    pixels = FRAME_SIZE * FRAME_SIZE  # every frame becomes 56 x 56: 4 tokens per chunk
    preprocessor = preprocessor_config("qwen2_vl", min_pixels=pixels, max_pixels=pixels)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(workdir)
    with open(workdir / "video_preprocessor_config.json", "w") as f:
        json.dump(preprocessor, f, indent=1)
    adapter = ADAPTERS["qwen2_vl"](model, tokenizer, name_or_path=str(workdir), preprocessor=preprocessor)
    return model, tokenizer, adapter


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, save, evaluate; returns the training record (also written as training.json)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    lengths = _lengths(args.lengths)
    first_lengths = _lengths(args.first_lengths) if args.first_lengths else lengths
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, adapter = build_model(args, out)
    model.train()
    # per vision token: colour (8) and shape ("none" + 4)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 8 + 5)
    # per video token, on the language model's states: shapes so far (4), after the first shape (2), colour back (2)
    state_head = torch.nn.Linear(model.config.text_config.hidden_size, 4 + 2 + 2)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    params = [*model.parameters(), *head.parameters(), *state_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, min(200, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, args.steps)))))
    batches = Batches(adapter, lengths, args.batch, args.seed)
    check = [batches.draw_single(length=n, seeds=[10_000_000 + n * 100 + i for i in range(12)],
                                 types=[t for t in batches.types for _ in range(2)])
             for n in (min(lengths), max(lengths))]
    history: list[dict[str, float]] = []
    recent: dict[str, list[bool]] = {t: [] for t in batches.types}  # training answers right, per question type
    load_at_start = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(args.steps), desc="train proxy", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        batches.lengths = first_lengths if step < args.first_steps else lengths
        b = batches.draw()
        outputs = model(**b["inputs"], output_hidden_states=args.state_weight > 0)
        logits = outputs.logits[:, :-1]  # (B, L-1, V)
        target = b["labels"][:, 1:]
        answer_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        tokens = captured["tokens"]  # (N video tokens, hidden): what the language model receives
        # the head reads normalised tokens: on raw ones the cross-entropy is driven to 0 by growing their norm (400x
        # the text embeddings' in a first run), and the language model then learned almost nothing from them
        aux = head(torch.nn.functional.layer_norm(tokens, tokens.shape[-1:]))  # (N, 13)
        aux_loss = (torch.nn.functional.cross_entropy(aux[:, :8], b["colour"])
                    + torch.nn.functional.cross_entropy(aux[:, 8:], b["shape"]))
        loss = answer_loss + args.aux_weight * aux_loss + args.feature_penalty * tokens.pow(2).mean()
        state_loss = torch.zeros(())
        if args.state_weight > 0:
            # the language model's video tokens, where the last layer's question tokens read them: what count, after
            # and repeat need, each a function of the chunk and those before it (without it these stayed near
            # chance while shape, first and last reached 1.00; see docs/benchmarks.md)
            states = outputs.hidden_states[-2][b["inputs"]["input_ids"] == adapter.video_token_id]  # (N, hidden)
            z = state_head(torch.nn.functional.layer_norm(states, states.shape[-1:]))  # (N, 8)
            state_loss = sum(torch.nn.functional.cross_entropy(z[:, a:e], y)
                             for (a, e), y in zip(((0, 4), (4, 6), (6, 8)), b["state"]))
            loss = loss + args.state_weight * state_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        first = (target != -100) & torch.cat([torch.ones_like(target[:, :1], dtype=torch.bool),
                                              target[:, :-1] == -100], dim=1)  # each answer's first token
        right = (logits.argmax(-1)[first] == target[first]).tolist()  # row-major: the blocks' order, b["types"]'s
        for t, r in zip(b["types"], right):
            recent[t].append(r)
        record = {"step": step + 1, "loss": answer_loss.item(), "aux_loss": aux_loss.item(),
                  "state_loss": state_loss.item(),
                  "train_acc": sum(right) / len(right)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record.update(held_out_check(model, check))
            record.update({f"train_acc_{t}": sum(v) / len(v) for t, v in recent.items() if v})  # since last check
            recent = {t: [] for t in batches.types}
            model.train()
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record['aux_loss']:.3f}",
                        **{k: f"{v:.2f}" for k, v in record.items() if k.startswith("check")})
        if "check_short" in record:
            bar.write(f"step {step + 1}: " + " ".join(f"{k.removeprefix('train_acc_')} {v:.2f}" for k, v in
                                                      record.items() if k.startswith("train_acc_")), file=sys.stderr)
    wall_s = time.perf_counter() - start
    # CPU time of this process: with one thread, about what the run takes on a quiet machine (the wall time
    # also counts the time other processes held the cores)
    cpu_s = time.process_time() - cpu_start
    hook.remove()
    model.eval()
    model.save_pretrained(out)  # the head is not part of the model: dropped here
    tokenizer.save_pretrained(out)
    record = {
        "script": "python -m jobs.train_proxy " + " ".join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "plot")},
        "seed": args.seed, "steps": args.steps, "train_wall_s": round(wall_s, 1), "train_cpu_s": round(cpu_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": {**machine(), "load_average_at_start_1_5_15": [round(x, 2) for x in load_at_start]},
        "torch_threads": args.threads,
        "final": {k: round(v, 4) for k, v in history[-1].items() if k != "step"},
        "curve": [{k: round(v, 4) for k, v in h.items()} for h in history if "check_short" in h],
    }
    if args.init is not None:  # the stages before this one, oldest first
        earlier = json.loads((args.init / "training.json").read_text())
        record["earlier_stages"] = [*earlier.pop("earlier_stages", []), earlier]
        record["train_wall_s_all_stages"] = round(sum(r["train_wall_s"] for r in record["earlier_stages"])
                                                  + wall_s, 1)
    eval_lengths = (_lengths(args.eval_lengths) if args.eval_lengths
                    else sorted({min(lengths), lengths[len(lengths) // 2], max(lengths)}))
    record["held_out"] = evaluate_checkpoint(out, eval_lengths, args.eval_videos, args.threads)
    with open(out / "training.json", "w") as f:
        json.dump(record, f, indent=1)
    if args.plot is not None:
        plot(history, args.plot)
    return record


def held_out_check(model: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    """First-answer-token accuracy on fixed held-out batches (the shortest and longest length): one forward each,
    cheap enough to watch during training. Every answer is one token, so this is answer accuracy."""
    import torch

    result = {}
    model.eval()
    with torch.no_grad():
        for name, b in zip(("check_short", "check_long"), batches):
            logits = model(**b["inputs"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            first = (target != -100) & torch.cat([torch.ones_like(target[:, :1], dtype=torch.bool),
                                                  target[:, :-1] == -100], dim=1)
            result[name] = float((logits.argmax(-1)[first] == target[first]).float().mean())
    return result


def evaluate_checkpoint(path: Path, lengths: list[int], videos: int, threads: int) -> dict[str, Any]:
    """Held-out accuracy of the saved checkpoint per question type and length, through statekv's `Full()` engine
    (loaded with `Engine.from_pretrained`) and the plain transformers model, which must agree."""
    import torch

    from statekv import Engine, Full
    from statekv.proxy.evaluate import evaluate
    from statekv.testing.reference import reference_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = Engine.from_pretrained(str(path), policy=Full(), device="cpu", dtype=torch.float32)
    report = evaluate(engine, lengths=lengths, videos_per_length=videos, reference=reference_model(str(path)))
    print(report.markdown(), file=sys.stderr)
    return {"videos_per_length": videos, "lengths": lengths, "accuracy": report.table(),
            "overall": round(report.accuracy(), 4), "engine_reference_agreement": report.agreement(),
            "reference_accuracy": {str(n): {r.type: round(r.reference_correct / r.n, 4) for r in report.rows
                                            if r.length == n} for n in lengths},
            "eval_wall_s": round(time.perf_counter() - start, 1)}


def machine() -> dict[str, Any]:
    """Where the training ran: CPU, cores, load (training shares its machine, so its wall time depends on it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_end_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform()}


def plot(history: list[dict[str, float]], path: Path) -> Path:
    """Answer and auxiliary loss (log scale) and accuracy (training batch, held-out checks) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [h["loss"] for h in history], lw=0.6, label="answer loss")
    ax_loss.plot(steps, [h["aux_loss"] for h in history], lw=0.6, label="vision (aux) loss")
    if any(h.get("state_loss") for h in history):
        ax_loss.plot(steps, [h["state_loss"] for h in history], lw=0.6, label="video-token state loss")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    window = 50
    acc = [h["train_acc"] for h in history]
    smooth = [sum(acc[max(0, i - window + 1):i + 1]) / len(acc[max(0, i - window + 1):i + 1]) for i in range(len(acc))]
    ax_acc.plot(steps, smooth, lw=0.8, label=f"training batches ({window}-step mean)")
    for key, label in (("check_short", "held-out, shortest length"), ("check_long", "held-out, longest length")):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax_acc.plot(*zip(*points), marker="o", ms=3, label=label)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("answer accuracy")
    ax_acc.legend()
    fig.suptitle("proxy model training (jobs/train_proxy.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = train(args)
    print(json.dumps({k: record[k] for k in ("steps", "train_wall_s", "held_out")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
