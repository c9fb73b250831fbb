"""The report written at the end of ``distil train``: final numbers and loss-curve plots."""

from __future__ import annotations

from pathlib import Path

from distil.charts import format_params, markdown_table, plot_curves, smooth


def write_run_report(run, cfg, result) -> Path:
    history = result.history
    window = max(1, len(history) // 20)
    plot_curves({"train loss": list(zip([h["step"] for h in history], smooth([h["loss"] for h in history], window)))},
                run.plots / "train_loss.png", title="Training loss", ylabel="loss")
    val_points = [(0, result.val_start["loss"])] if result.val_start else []
    val_points += [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val_points:
        plot_curves({"held-out loss": val_points}, run.plots / "val_loss.png", title="Held-out loss", markers=True)
    rows = [["parameters", format_params(result.student.num_parameters())], ["steps", len(history)],
            ["tokens", f"{history[-1]['tokens']:,}" if history else 0], ["tokens/s", f"{result.tokens_per_second:,.0f}"],
            ["final train loss", f"{history[-1]['loss']:.4f}" if history else "-"]]
    rows += [[f"held-out {k} before training", f"{v:.4f}"] for k, v in result.val_start.items() if k != "tokens"]
    rows += [[f"held-out {k}", f"{v:.4f}"] for k, v in result.val.items() if k != "tokens"]
    loss = cfg.loss
    objective = f"{loss.ce_weight} x CE" if loss.ce_weight else ""
    if loss.kd_weight and cfg.teacher.source != "none":
        objective += (" + " if objective else "") + f"{loss.kd_weight} x {loss.kind} (T={loss.temperature})"
    text = f"""# Run {run.path.name}

Objective: {objective}. Teacher: {cfg.teacher.path or 'none'}.

{markdown_table(["metric", "value"], rows)}

![training loss](plots/train_loss.png)
{"![held-out loss](plots/val_loss.png)" if val_points else ""}

The resolved config is in `config.yaml`; every logged number is in `metrics.jsonl`;
the final student (with its tokenizer) is in `checkpoints/final`.
"""
    return run.write_text("report.md", text)
