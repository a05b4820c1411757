"""Fidelity harness: run `Full` and any set of settings over videos and questions, and compare them.

    from statekv.eval import EvalItem, parse_settings, run_fidelity
    report = run_fidelity(engine, [EvalItem("clip.mp4", "What happens?")], parse_settings(["window:64", "statekv:64"]),
                          store_root="/tmp/eval-caches")
    print(report.to_markdown())

Per setting it reports the first answer token's KL divergence and top-1 agreement against `Full`, greedy agreement
over N tokens, prefill FLOPs, stored bytes, bytes read per question and answer latency; with a multiple-choice
dataset (`load_choice_dataset`) it also reports accuracy. Random weights say nothing about real accuracy: on tiny
random checkpoints only the comparison to `Full` means anything.
"""

from statekv.eval.choice import choice_prompt, load_choice_dataset
from statekv.eval.fidelity import FidelityReport, run_fidelity
from statekv.eval.items import EvalItem
from statekv.eval.metering import ReadMeter
from statekv.eval.metrics import first_token_kl, greedy_agreement
from statekv.eval.settings import SETTING_KINDS, Setting, parse_setting, parse_settings

__all__ = [
    "EvalItem", "FidelityReport", "ReadMeter", "SETTING_KINDS", "Setting", "choice_prompt",
    "first_token_kl", "greedy_agreement", "load_choice_dataset", "parse_setting", "parse_settings", "run_fidelity",
]
