"""Fidelity against cost: one PNG with two panels (KL of the first answer token vs bytes read per question, and
top-1 agreement vs prefill FLOPs), one point per setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_fidelity(summary: list[dict[str, Any]], path: Path) -> Path:
    """Draw `summary` (FidelityReport.summary()) to `path`; needs matplotlib (in the `dev` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib, or run with --no-plot)") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in summary:
        kl = max(row["first_token_kl"], 1e-12)  # log axis: Full's own KL is 0
        left.scatter(row["bytes_read_per_question"] / 1e6, kl)
        left.annotate(row["setting"], (row["bytes_read_per_question"] / 1e6, kl), fontsize=8)
        if row["prefill_flops"] is not None:
            right.scatter(row["prefill_flops"] / 1e9, row["top1_agreement"])
            right.annotate(row["setting"], (row["prefill_flops"] / 1e9, row["top1_agreement"]), fontsize=8)
    left.set(xlabel="MB read per question", ylabel="KL(Full || setting), first answer token", yscale="log",
             title="fidelity vs bytes read")
    right.set(xlabel="prefill GFLOPs per video", ylabel="top-1 agreement with Full", ylim=(-0.05, 1.05),
              title="fidelity vs prefill cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
