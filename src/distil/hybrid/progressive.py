"""Progressive conversion: replace 1 -> 5 -> 25 -> 45 of N layers, distilling after each stage.

    stages = convert_progressively(teacher, [1, 5, 25, 45], distil_stage, strategy="uniform", data=ids)

Each stage chooses its SSM layers (by ``strategy``, scored once on the teacher), then builds its
student from the previous stage's trained student: layers that were already SSM keep their
trained mixers, newly converted layers get MIL from the teacher's attention, and everything else
(MLPs, norms, remaining attention) carries the previous stage's trained weights. ``distil_stage``
trains it (for example :func:`distil.train.loop.train` with reverse KL) and returns the trained
model. ``train_only_ssm=True`` freezes everything but the SSM mixers. A single stage is one-shot
conversion; ``init="random"`` starts the newly converted layers at random instead of MIL.

``distil train`` runs this recipe from a config's ``hybrid:`` section (distil/train/stages.py), with
a run folder per stage and resumption.

The lab report in the source documents found that initialising from an earlier hybrid's trained
layers sped up the start of each stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distil.errors import DistilError
from distil.hybrid.mil import hybridize
from distil.hybrid.placement import LayerSelection, select_layers


@dataclass
class Stage:
    num_ssm: int
    selection: LayerSelection
    model: object


def freeze_all_but_ssm(model) -> None:
    for block in model.layers:
        for name, p in block.named_parameters():
            p.requires_grad_(name.startswith("mamba."))
    for module in (model.embed_tokens, model.norm, model.lm_head):
        module.requires_grad_(False)


def convert_progressively(teacher, stages: list[int], distil_stage: Callable, *, strategy="uniform", data=None,
                          mixer: str = "mamba2", d_state: int = 16, train_only_ssm: bool = False, init: str = "mil",
                          scores: dict[int, float] | None = None, score: str = "local",
                          calibration=None, **hybrid_kwargs) -> list[Stage]:
    """Run the stage list; returns each stage's selection and trained model.

    ``scores`` (from :func:`~distil.hybrid.placement.layer_scores`) skips the scoring pass;
    ``calibration`` (token ids [n, seq]) calibrates MIL (``init="mil"``; default: ``data``);
    ``distil_stage(student, selection)`` returns the trained student.
    """
    if not stages or any(b <= a for a, b in zip(stages, stages[1:])):
        raise DistilError(f"stages {stages} should be increasing numbers of SSM layers")
    if scores is None and strategy in ("importance", "uniform"):
        scores = select_layers(teacher, 0, strategy, data, score=score, mixer=mixer, d_state=d_state,
                               **hybrid_kwargs).scores
    previous_layers: set[int] = set()
    current = teacher
    results = []
    for num_ssm in stages:
        selection = select_layers(teacher, num_ssm, strategy, data, scores=scores)
        layers = set(selection.ssm_layers)
        if not previous_layers <= layers:
            # Keep every trained SSM layer: swap the newest choices for the previous stage's layers.
            extra = sorted(layers - previous_layers, key=lambda i: (scores or {}).get(i, 0.0))
            layers = previous_layers | set(extra[: num_ssm - len(previous_layers)])
            selection = LayerSelection(sorted(layers), selection.strategy, selection.scores, selection.score_kind)
        # Newly converted layers take MIL from the *teacher's* attention (the previous stage may have
        # trained that attention further; the teacher's is what MIL is defined on).
        student = hybridize(current, sorted(layers - previous_layers), mixer=mixer, init=init, d_state=d_state,
                            attention_from=teacher, calibration=calibration if calibration is not None else data,
                            **hybrid_kwargs)
        if train_only_ssm:
            freeze_all_but_ssm(student)
        current = distil_stage(student, selection)
        results.append(Stage(num_ssm, selection, current))
        previous_layers = layers
    return results
