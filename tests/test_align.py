"""Stage-2 alignment: each new mixer learns the attention output it replaces; nothing else moves."""

import copy

import pytest
import torch

from distil.errors import DistilError
from distil.hybrid import hybridize
from distil.hybrid.align import AlignState, align_layers, alignment_loss, record
from distil.models import ModelConfig, TransformerLM

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    original = TransformerLM(ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=2)).eval()
    tokens = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(1))
    return original, tokens


@pytest.mark.parametrize("mixer, d_state, expand", [("mamba2", 16, None), ("mamba2", 4, 2.0), ("discrete_mamba2", 8, None)])
def test_alignment_lowers_the_loss_and_moves_only_the_new_mixers(pair, mixer, d_state, expand):
    original, tokens = pair
    with torch.no_grad():
        hybrid = hybridize(original, [1, 3], mixer=mixer, init="random", d_state=d_state, chunk_size=8, expand=expand)
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    original_before = {k: v.clone() for k, v in original.state_dict().items()}
    result = align_layers(hybrid, original, tokens, layers=[1, 3], steps=40, lr=3e-3, batch_size=4, progress=False)
    for layer in (1, 3):
        losses = result.history[layer]
        assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, (layer, losses[:5], losses[-5:])
    for name, value in hybrid.state_dict().items():
        if not name.startswith(("layers.1.mamba.", "layers.3.mamba.")):
            assert torch.equal(value, before[name]), f"{name} changed"
    assert any(not torch.equal(hybrid.state_dict()[n], before[n]) for n in before if n.startswith("layers.1.mamba."))
    for name, value in original.state_dict().items():
        assert torch.equal(value, original_before[name]), f"the original's {name} changed"


def test_a_mixer_that_already_reproduces_its_target_has_zero_loss_and_gradient(pair):
    original, tokens = pair
    with torch.no_grad():
        hybrid = hybridize(original, [2], mixer="mamba2", init="random", d_state=16, chunk_size=8)
    reference = copy.deepcopy(hybrid)  # its layer-2 mixer is exactly the hybrid's
    pairs = record(reference, [2], tokens)
    inputs, targets = pairs[2]
    mixer = hybrid.layers[2].mamba
    prediction, _ = mixer(inputs)
    for kind in ("mse", "nmse"):
        mixer.zero_grad()
        value = alignment_loss(prediction, targets, kind, scale=float(targets.pow(2).mean()))
        value.backward(retain_graph=True)
        assert value.item() == 0.0
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in mixer.parameters())
    before = {k: v.clone() for k, v in mixer.state_dict().items()}
    result = align_layers(hybrid, reference, tokens, layers=[2], steps=5, lr=1e-2, loss="mse", progress=False)
    assert result.history[2] == [0.0] * 5
    assert all(torch.equal(v, before[k]) for k, v in mixer.state_dict().items())  # zero gradient: AdamW moves nothing


def test_record_gives_each_layers_mixer_input_and_attention_output(pair):
    original, tokens = pair
    pairs = record(original, [0, 2], tokens[:3], batch_size=2)
    for layer in (0, 2):
        inputs, outputs = pairs[layer]
        assert inputs.shape == outputs.shape == (3, 24, 32)
    # Layer 0's mixer input is the normed embedding; its output is what attention adds to the stream.
    with torch.no_grad():
        x = original.embed_tokens(tokens[:3])
        torch.testing.assert_close(pairs[0][0], original.layers[0].input_layernorm(x))


def test_resume_mid_alignment_is_exact(pair, tmp_path):
    original, tokens = pair

    def fresh():
        with torch.no_grad():
            return hybridize(original, [1, 3], mixer="mamba2", init="random", d_state=16, chunk_size=8)

    whole = fresh()
    align_layers(whole, original, tokens, layers=[1, 3], steps=20, lr=3e-3, progress=False)

    saved = []

    class Killed(Exception):
        pass

    def checkpoint(state):
        torch.save(state.state_dict(), tmp_path / "align.pt")
        saved.append(state.step)
        if state.layer == 3 and state.step == 10:
            raise Killed  # as a SIGKILL right after the checkpoint of step 10 of the second layer

    interrupted = fresh()
    with pytest.raises(Killed):
        align_layers(interrupted, original, tokens, layers=[1, 3], steps=20, lr=3e-3, checkpoint_every=5,
                     on_checkpoint=checkpoint, progress=False)
    resumed = fresh()  # a new process: the model as converted, then the saved state
    state = AlignState.from_state_dict(torch.load(tmp_path / "align.pt", weights_only=False))
    assert state.done == [1] and state.layer == 3 and state.step == 10
    result = align_layers(resumed, original, tokens, layers=[1, 3], steps=20, lr=3e-3, state=state, progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert len(result.history[3]) == 20


def test_bad_alignment_settings_are_clear_errors(pair):
    original, tokens = pair
    with torch.no_grad():
        hybrid = hybridize(original, [1], mixer="mamba2", init="random", d_state=16, chunk_size=8)
    with pytest.raises(DistilError, match="attention"):
        align_layers(hybrid, original, tokens, layers=[0], steps=1, progress=False)
    with pytest.raises(DistilError, match="not one of"):
        align_layers(hybrid, original, tokens, layers=[1], steps=1, loss="l1", progress=False)


def test_staged_conversion_aligns_each_new_layer_before_its_kd(tmp_path, tiny_tokenizer, tiny_corpus_file):
    import json

    from distil.config import config_from_dict
    from distil.models.io import save_native
    from distil.run_dir import read_metrics
    from distil.train.run import run_training

    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=4, n_heads=2))
    save_native(teacher, tmp_path / "teacher", tokenizer=tiny_tokenizer)
    cfg = config_from_dict({
        "teacher": {"source": "model", "path": str(tmp_path / "teacher")},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-4, "warmup_steps": 1, "progress": False, "val_every": 0,
                  "device": "cpu"},
        "eval": {"val_batches": 1},
        "hybrid": {"stages": [1, 2], "placement": "first", "d_state": 8, "chunk_size": 8,
                   "align": {"steps": 12, "lr": 3e-3, "samples": 8, "checkpoint_every": 5}},
    })
    outcome = run_training(cfg, tmp_path / "run")
    records = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [r["align"]["layers"] for r in records] == [[0], [1]]  # each stage aligns only its new layer
    for stage_record, layer in zip(records, (0, 1)):
        assert stage_record["align"]["final"][str(layer)] < stage_record["align"]["first"][str(layer)]
        assert stage_record["after_align"]["kl_to_teacher"] <= stage_record["before"]["kl_to_teacher"] + 1e-6
        stage = tmp_path / "run" / f"stage-{stage_record['stage']}"
        rows = [r for r in read_metrics(stage / "metrics.jsonl") if r["split"] == "align"]
        assert len(rows) == 12 and {r["name"] for r in rows} == {f"layer_{layer}"}
        assert (stage / "plots" / "alignment.png").is_file()
    assert "after alignment" in (tmp_path / "run" / "report.md").read_text()
    assert outcome.stages is not None


def test_hybridize_command_aligns_and_writes_the_losses(tmp_path, tiny_tokenizer, tiny_docs, monkeypatch):
    import json

    from distil import cli
    from distil.models import load
    from distil.models.io import save_native

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=4, n_heads=2))
    save_native(model, tmp_path / "m", tokenizer=tiny_tokenizer)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    args = ["hybridize", str(tmp_path / "m"), "--out", str(tmp_path / "h"), "--layers", "1,2", "--d-state", "8",
            "--chunk-size", "8", "--data", str(tmp_path / "d.jsonl"), "--samples", "6", "--seq-len", "32",
            "--align-steps", "15", "--align-lr", "3e-3"]
    cli.main(args)
    alignment = json.loads((tmp_path / "h" / "alignment.json").read_text())
    for layer in ("1", "2"):
        losses = alignment["history"][layer]
        assert len(losses) == 15 and losses[-1] < losses[0]
    assert (tmp_path / "h" / "plots" / "alignment.png").is_file()
    assert (tmp_path / "h" / "metrics.jsonl").is_file()
    hybrid = load(tmp_path / "h")
    assert hybrid.config.pattern == "AMMA"
    for name, value in model.state_dict().items():  # attention layers and everything else: untouched
        if not name.startswith(("layers.1.", "layers.2.")):
            assert torch.equal(hybrid.state_dict()[name], value), name


def test_alignment_works_unchanged_on_a_gemma_like_teacher():
    """Gemma 3's layout (sandwich and (1 + w) norms, q/k norms, GeGLU, sliding layers with their own rope
    base): each new mixer still learns its attention's output, a sliding and the global layer alike."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=2, qk_norm=True, norm_plus_one=True,
                      sandwich_norms=True, mlp_activation="gelu_tanh", scale_embeddings=True, sliding_window=6,
                      rope_local_theta=100.0, layer_types=["sliding", "sliding", "sliding", "full"])
    original = TransformerLM(cfg).eval()
    tokens = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hybrid = hybridize(original, [1, 3], init="mil", d_state=16, chunk_size=8, calibration=tokens[:4])
    result = align_layers(hybrid, original, tokens, layers=[1, 3], steps=40, lr=3e-3, batch_size=4, progress=False)
    for layer in (1, 3):
        losses = result.history[layer]
        assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, (layer, losses[:5], losses[-5:])
