"""Run logging: TensorBoard scalars, a JSONL log, and end-of-run plots (loss per task, expert usage per task)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


class MetricLogger:
    """Appends to metrics.jsonl and TensorBoard. A run that (re)starts at `resume_step` first drops what an earlier
    attempt logged after that step's checkpoint, which this attempt logs again: metrics.jsonl is rewritten
    (atomically) without those rows, and TensorBoard purges the steps from there on."""

    def __init__(self, output_dir: Path, task_names: Sequence[str], resume_step: int = 0, max_steps: int = 0):
        from tensorboardX import SummaryWriter

        self.output_dir = Path(output_dir)
        self.task_names = list(task_names)
        path = self.output_dir / "metrics.jsonl"
        # The eval at the resume step is redone at a fresh start (step 0) and after the last step (the final one).
        redo_eval = resume_step == 0 or resume_step >= max_steps
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _keep(json.loads(line), resume_step, redo_eval)]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"),
                                    purge_step=resume_step if redo_eval else resume_step + 1)
        self.jsonl = open(path, "a")

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        for name, value in scalars.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(f"{kind}/{name}", float(value), step)
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **{k: _plain(v) for k, v in scalars.items()}}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def _keep(row: dict, resume_step: int, redo_eval: bool) -> bool:
    step = row.get("step", 0)
    return step < resume_step or (step == resume_step and not (row.get("kind") == "eval" and redo_eval))


def _plain(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else None


def per_task_scalars(prefix: str, task_names: Sequence[str], sums: np.ndarray, counts: np.ndarray) -> dict:
    return {f"{prefix}/{name}": float(s / c) for name, s, c in zip(task_names, sums, counts) if c > 0}


def read_log(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(output_dir: Path, task_names: Sequence[str], expert_usage: Optional[np.ndarray]) -> list[Path]:
    """Writes loss_per_task.png (train and validation loss per task over steps) and, for MoGE runs,
    expert_usage.png (share of each task's routed tokens per expert, one panel per MoE layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    records = read_log(output_dir / "metrics.jsonl")
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, kind, title in ((axes[0], "train", "train loss per task"), (axes[1], "eval", "validation loss per task")):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 18 tasks: the default 10-colour cycle would repeat
        rows = [r for r in records if r["kind"] == kind]
        for name in task_names:
            key = f"task_loss/{name}"
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if kind == "eval" else None, ms=3, lw=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.subplots_adjust(right=0.83)
    path = output_dir / "loss_per_task.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if expert_usage is not None and expert_usage.size:
        layers, tasks, experts = expert_usage.shape
        share = expert_usage / np.maximum(expert_usage.sum(-1, keepdims=True), 1e-9)
        fig, axes = plt.subplots(1, layers, figsize=(2.2 + 2.4 * layers, 0.9 + 0.32 * tasks), squeeze=False)
        for layer in range(layers):
            ax = axes[0][layer]
            image = ax.imshow(share[layer], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"MoE layer {layer}")
            ax.set_xticks(range(experts))
            ax.set_xlabel("expert")
            ax.set_yticks(range(tasks))
            ax.set_yticklabels(task_names if layer == 0 else [""] * tasks, fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of routed tokens")
        path = output_dir / "expert_usage.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
