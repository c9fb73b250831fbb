"""SSM mixers against transformers and the sequential recurrence; hybrids, placement, export, generation."""

import json

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from distil.errors import DistilError
from distil.hybrid import hybridize, select_layers
from distil.hybrid.progressive import convert_progressively
from distil.models import DiscreteMamba2Mixer, Mamba2Mixer, ModelConfig, TransformerLM, load
from distil.models.export import export_hf
from distil.models.generate import generate
from distil.models.io import save_native
from distil.models.ssm import ssd_chunked, ssd_sequential

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default


def _perturb(module, scale=0.1):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_mamba2_matches_transformers_with_copied_weights():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(hidden_size=32, state_size=8, expand=2, head_dim=16, n_groups=2, conv_kernel=4,
                                    chunk_size=8, num_heads=4, use_bias=False, use_conv_bias=True)
    hf = HFMamba2Mixer(cfg, layer_idx=0).eval()
    _perturb(hf)
    ours = Mamba2Mixer(32, d_state=8, expand=2, head_dim=16, n_groups=2, d_conv=4, chunk_size=8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 21, 32)  # 21: not a multiple of the chunk
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 32])
@pytest.mark.parametrize("length", [1, 7, 16])
def test_chunked_scan_equals_sequential_recurrence(chunk_size, length):
    g = torch.Generator().manual_seed(length * 31 + chunk_size)
    x = torch.randn(2, length, 4, 5, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, length, 4, generator=g, dtype=torch.float64) * 2
    B, C = (torch.randn(2, length, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    initial = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    y1, s1 = ssd_chunked(x, log_decay, B, C, chunk_size=chunk_size, initial_state=initial)
    y2, s2 = ssd_sequential(x, log_decay, B, C, initial_state=initial)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(s1, s2, atol=1e-12, rtol=1e-10)


def _mixers():
    torch.manual_seed(0)
    m2 = Mamba2Mixer(24, d_state=6, expand=2, head_dim=8, n_groups=3, d_conv=4, chunk_size=5)
    d2 = DiscreteMamba2Mixer(24, d_state=6, n_qk_heads=2, n_v_heads=4, expand=1, d_conv=3, chunk_size=5)
    for m in (m2, d2):
        _perturb(m, 0.3)
    return {"mamba2": m2, "discrete_mamba2": d2}


@pytest.mark.parametrize("kind", ["mamba2", "discrete_mamba2"])
def test_piecewise_forward_with_carried_state_equals_whole(kind):
    mixer = _mixers()[kind].double()
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    with torch.no_grad():
        whole, whole_state = mixer(x)
        pieces, state = [], None
        for start, end in ((0, 6), (6, 7), (7, 19), (19, 23)):
            out, state = mixer(x[:, start:end], state=state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(state.ssm, whole_state.ssm, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kind", ["mamba2", "discrete_mamba2"])
def test_step_equals_forward(kind):
    mixer = _mixers()[kind].double()
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = mixer(x)
        state = mixer.empty_state(3, dtype=torch.float64)
        steps = []
        for t in range(9):
            y, state = mixer.step(x[:, t], state)
            steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), whole, atol=1e-10, rtol=1e-9)


class _Float32Spotter(TorchDispatchMode):
    """Records every op that makes a floating tensor narrower than float64."""

    def __init__(self):
        super().__init__()
        self.narrow = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.narrow.add(f"{func} -> {t.dtype}")
        return out


@pytest.mark.parametrize("kind", ["mamba2", "discrete_mamba2"])
def test_a_float64_mixer_computes_every_op_in_float64(kind):
    """The float64 reference checks (step = forward, chunked = sequential, fast glue = reference)
    hold to 1e-10 only if no op rounds to float32 on the way: on AVX-512 a float32 gated norm made
    step and forward differ by 4.7e-6 relative. This holds on any CPU, so the drop fails here first."""
    mixer = _mixers()[kind].double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    with torch.no_grad(), _Float32Spotter() as spotter:
        _, state = mixer(x)
        mixer.step(x[:, -1], state)
    assert not spotter.narrow, sorted(spotter.narrow)


def _teacher(n_layers=4, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, d_model=48, n_layers=n_layers, n_heads=4, n_kv_heads=2, **kw)
    return TransformerLM(ModelConfig(**cfg)).eval()


# Gemma 3's layout in small: (1 + w) norms, sandwich norms, q/k norms, GeGLU, scaled embeddings, a query scale,
# sliding layers (window 5) with their own rope base and one global layer.
GEMMA_LIKE = dict(qk_norm=True, norm_plus_one=True, sandwich_norms=True, mlp_activation="gelu_tanh",
                  scale_embeddings=True, query_scale=0.2, sliding_window=5, rope_local_theta=100.0,
                  layer_types=["sliding", "sliding", "sliding", "full"])


def _gemma_teacher():
    teacher = _teacher(**GEMMA_LIKE)
    _perturb(teacher)  # norms away from their zero start, so a dropped (1 + w) would show
    return teacher


def test_hybridize_with_no_layers_reproduces_the_teacher():
    teacher = _teacher()
    x = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert torch.equal(hybridize(teacher, [])(x), teacher(x))


@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
@pytest.mark.parametrize("d_state", [6, 12, 20])  # smaller than, equal to, larger than head_dim 12
def test_mil_copies_attention_weights(mixer, d_state):
    teacher = _teacher()
    hybrid = hybridize(teacher, [1], mixer=mixer, d_state=d_state, chunk_size=8, init="mil_plain")
    assert hybrid.config.pattern == ("AMAA" if mixer == "mamba2" else "ADAA")
    attn, ssm = teacher.layers[1].self_attn, hybrid.layers[1].mamba
    head_dim, rows = 12, min(d_state, 12)
    x_off, b_off = (ssm.d_inner, 2 * ssm.d_inner) if mixer == "mamba2" else (0, ssm.d_inner)
    c_off = b_off + 4 * d_state
    w = ssm.in_proj.weight
    for h in range(4):
        kv = h // 2  # GQA: two query heads share a key/value head
        assert torch.equal(w[x_off + h * head_dim : x_off + (h + 1) * head_dim], attn.v_proj.weight[kv * head_dim : (kv + 1) * head_dim])
        assert torch.equal(w[b_off + h * d_state : b_off + h * d_state + rows], attn.k_proj.weight[kv * head_dim : kv * head_dim + rows])
        assert torch.equal(w[c_off + h * d_state : c_off + h * d_state + rows], attn.q_proj.weight[h * head_dim : h * head_dim + rows])
    assert torch.equal(ssm.out_proj.weight, attn.o_proj.weight)
    for name in ("mlp.gate_proj.weight", "input_layernorm.weight"):
        assert torch.equal(hybrid.layers[1].get_parameter(name), teacher.layers[1].get_parameter(name))
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(hybrid(x)).all()


@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
@pytest.mark.parametrize("d_state", [6, 12])
def test_calibrated_mil_opens_the_gate_and_matches_each_heads_output_scale(mixer, d_state):
    """Calibrated MIL: the attention weights copied as in plain MIL, no skip (D = 0), a pass-through
    conv, and each head's output (what out_proj reads) at the RMS the attention head had on the
    calibration text."""
    from distil.hybrid.mil import DECAY, calibrate

    teacher = _teacher()
    tokens = torch.randint(0, 61, (4, 24))
    calib = calibrate(teacher, tokens, [1])
    hybrid = hybridize(teacher, [1], mixer=mixer, d_state=d_state, chunk_size=8, calibration=calib)
    plain = hybridize(teacher, [1], mixer=mixer, d_state=d_state, chunk_size=8, init="mil_plain")
    ssm, ref = hybrid.layers[1].mamba, plain.layers[1].mamba
    torch.testing.assert_close(ssm.out_proj.weight, ref.out_proj.weight, rtol=0, atol=0)
    assert torch.all(ssm.D == 0)
    taps = ssm.conv1d.weight[:, 0]
    assert torch.all(taps[:, :-1] == 0) and torch.all(taps[:, -1] > 0)
    captured = []
    ssm.out_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        ssm(calib[1].inputs)
    head_rms = captured[0].unflatten(-1, (4, 12)).pow(2).mean(-1).sqrt().reshape(-1, 4).mean(0)
    torch.testing.assert_close(head_rms, calib[1].head_rms, rtol=1e-4, atol=1e-6)
    h = calib[1].inputs
    if mixer == "mamba2":
        z = h @ ssm.in_proj.weight[: ssm.d_inner].T  # the gate's input on every token
        assert torch.nn.functional.silu(z).median() > 4.0  # open
        assert torch.allclose(torch.exp(-torch.exp(ssm.A_log) * torch.nn.functional.softplus(ssm.dt_bias)),
                              torch.tensor(DECAY))
    else:
        assert torch.allclose(torch.nn.functional.silu(ssm.z_bias), torch.ones(()))


def test_size_matched_mil_has_one_ssm_head_per_kv_head_and_is_not_larger():
    """width="kv": under grouped-query attention the mixer is no larger than the attention it
    replaces; x and B come from each KV head, C is the mean of its query heads' W_Q, and the output
    columns the sum of their W_O columns."""
    from distil.hybrid.mil import calibrate, size_difference

    teacher = _teacher()  # 4 query heads, 2 KV heads, head_dim 12
    tokens = torch.randint(0, 61, (4, 24))
    small = hybridize(teacher, [1, 2], d_state=6, chunk_size=8, init="mil_plain", width="kv")
    big = hybridize(teacher, [1, 2], d_state=6, chunk_size=8, init="mil_plain")
    assert small.num_parameters() < teacher.num_parameters() < big.num_parameters()
    size = size_difference(teacher, small)
    assert size["mixer"] < size["attention"] and size["layers"] == 2
    attn, ssm = teacher.layers[1].self_attn, small.layers[1].mamba
    assert (ssm.d_inner, ssm.n_heads, ssm.n_groups) == (24, 2, 2)
    w, hd = ssm.in_proj.weight, 12
    x_off, b_off = ssm.d_inner, 2 * ssm.d_inner
    c_off = b_off + 2 * 6
    for g in range(2):
        assert torch.equal(w[x_off + g * hd : x_off + (g + 1) * hd], attn.v_proj.weight[g * hd : (g + 1) * hd])
        assert torch.equal(w[b_off + g * 6 : b_off + (g + 1) * 6], attn.k_proj.weight[g * hd : g * hd + 6])
        q = attn.q_proj.weight
        torch.testing.assert_close(w[c_off + g * 6 : c_off + (g + 1) * 6],
                                   (q[2 * g * hd : 2 * g * hd + 6] + q[(2 * g + 1) * hd : (2 * g + 1) * hd + 6]) / 2)
        o = attn.o_proj.weight
        torch.testing.assert_close(ssm.out_proj.weight[:, g * hd : (g + 1) * hd],
                                   o[:, 2 * g * hd : (2 * g + 1) * hd] + o[:, (2 * g + 1) * hd : (2 * g + 2) * hd])
    # Calibrated: each SSM head's output at the mean RMS of the query heads it stands for.
    calib = calibrate(teacher, tokens, [1])
    ssm = hybridize(teacher, [1], d_state=6, chunk_size=8, calibration=calib, width="kv").layers[1].mamba
    captured = []
    ssm.out_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        ssm(calib[1].inputs)
    head_rms = captured[0].unflatten(-1, (2, hd)).pow(2).mean(-1).sqrt().reshape(-1, 2).mean(0)
    torch.testing.assert_close(head_rms, calib[1].head_rms.reshape(2, 2).mean(1), rtol=1e-4, atol=1e-6)
    # A model without grouped-query attention gets the usual layout either way.
    mha = TransformerLM(ModelConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4))
    assert hybridize(mha, [1], d_state=6, chunk_size=8, init="mil_plain", width="kv").num_parameters() == \
        hybridize(mha, [1], d_state=6, chunk_size=8, init="mil_plain").num_parameters()
    with pytest.raises(DistilError, match="mamba2 only"):
        hybridize(teacher, [1], mixer="discrete_mamba2", init="mil_plain", width="kv")
    with pytest.raises(DistilError, match="leave expand unset"):
        hybridize(teacher, [1], init="mil_plain", width="kv", expand=2.0)


def test_mil_needs_calibration_text():
    with pytest.raises(DistilError, match="calibration"):
        hybridize(_teacher(), [1])
    with pytest.raises(DistilError, match="init"):
        hybridize(_teacher(), [1], init="mli")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("score", ["mil", "leave_one_out"])
def test_kl_layer_scores_equal_whole_model_runs(score, family):
    """Scoring reruns only the changed layer and those above it from cached inputs: the KL must be
    what a whole converted model gives (with Gemma's norms after the mixer and per-layer rope too)."""
    from distil.hybrid.mil import calibrate
    from distil.hybrid.placement import layer_scores
    from distil.losses import kd_loss

    teacher = _teacher() if family == "llama" else _gemma_teacher()
    data = torch.randint(0, 61, (5, 16))
    scores = layer_scores(teacher, data, score=score, d_state=8, chunk_size=8, batch_size=2)
    calib = calibrate(teacher, data, range(4))
    with torch.no_grad():
        reference = teacher(data)
        for i in range(4):
            if score == "mil":
                changed = hybridize(teacher, [i], d_state=8, chunk_size=8, calibration=calib)
            else:
                changed = hybridize(teacher, [], init="random")
                changed.layers[i].self_attn.o_proj.weight.zero_()
            expected = kd_loss(changed(data), reference, "forward_kl").item()
            assert scores[i] == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_local_layer_scores_measure_the_replacement_error(family):
    """Per token, |what attention adds - what the mixer would add|^2 / |x + what attention adds|^2; with
    Gemma's sandwich norms what a mixer adds is its output after post_attention_layernorm."""
    from distil.hybrid.mil import calibrate, fresh_mil_mixer
    from distil.hybrid.placement import layer_scores

    teacher = _teacher() if family == "llama" else _gemma_teacher()
    data = torch.randint(0, 61, (3, 16))
    scores = layer_scores(teacher, data, d_state=8, chunk_size=8)
    calib = calibrate(teacher, data, [2])
    mixer = fresh_mil_mixer(teacher, 2, "mamba2", calib[2], d_state=8, chunk_size=8)
    block = teacher.layers[2]
    inputs = []
    block.register_forward_pre_hook(lambda m, a: inputs.append(a))
    with torch.no_grad():
        teacher(data)
        x, cos, sin = inputs[0]
        h = block.input_layernorm(x)
        post = block.post_attention_layernorm if family == "gemma3" else (lambda t: t)
        attention, replaced = post(block.self_attn(h, cos, sin)[0]), post(mixer(h)[0])
        expected = ((attention - replaced).pow(2).sum(-1) / (x + attention).pow(2).sum(-1)).mean()
    assert scores[2] == pytest.approx(expected.item(), rel=1e-4)
    assert all(v > 0 for v in scores.values())


def test_converted_and_reloaded_hybrids_order_their_parameters_alike(tmp_path):
    """Optimizer states are saved by parameter order: a model converted in memory must list its
    parameters as the same model loaded from disk does, or resuming its training breaks."""
    hybrid = hybridize(_teacher(), [0, 2], mixer="discrete_mamba2", d_state=8, init="mil_plain")
    hybrid = hybridize(hybrid, [1], d_state=8, init="mil_plain")
    save_native(hybrid, tmp_path / "h")
    assert [n for n, _ in hybrid.named_parameters()] == [n for n, _ in load(tmp_path / "h").named_parameters()]


def test_native_save_load_of_hybrids_is_exact(tmp_path):
    hybrid = hybridize(hybridize(_teacher(), [1], chunk_size=8, init="mil_plain"), [3], mixer="discrete_mamba2", chunk_size=8, init="mil_plain").eval()
    assert hybrid.config.pattern == "AMAD"
    save_native(hybrid, tmp_path / "h")
    again = load(tmp_path / "h").eval()
    x = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        assert torch.equal(again(x), hybrid(x))


def test_export_round_trip_through_transformers(tmp_path):
    teacher = _teacher()
    # The size-matched layout (width kv) is narrower than d_model: GraniteMoeHybrid cannot hold it.
    narrow = hybridize(teacher, [0, 2], d_state=8, chunk_size=8, init="mil_plain", width="kv")
    with pytest.raises(DistilError, match="size-matched width 'kv' is narrower than d_model"):
        export_hf(narrow, tmp_path / "narrow")
    hybrid = hybridize(teacher, [0, 2], d_state=8, chunk_size=8, init="mil_plain").eval()
    _perturb(hybrid.layers[0].mamba, 0.05)
    assert export_hf(hybrid, tmp_path / "hybrid") == "GraniteMoeHybridForCausalLM"
    config = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert "auto_map" not in config  # no custom code
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    x = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, hybrid(x), atol=1e-4, rtol=0)
    # A plain Llama maps onto GraniteMoeHybrid with zero logit difference.
    export_hf(teacher, tmp_path / "llama_as_granite", hybrid_format="granite")
    granite = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama_as_granite").eval()
    with torch.no_grad():
        assert torch.equal(granite(x).logits, teacher(x))


def test_discrete_mamba2_export_is_refused_with_a_reason(tmp_path):
    hybrid = hybridize(_teacher(), [1], mixer="discrete_mamba2", chunk_size=8, init="mil_plain")
    with pytest.raises(DistilError, match="discrete Mamba2.*native"):
        export_hf(hybrid, tmp_path / "x")


@pytest.mark.parametrize("strategy", ["importance", "uniform"])
def test_select_layers_is_deterministic(strategy):
    teacher = _teacher(n_layers=6)
    data = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    first = select_layers(teacher, 4, strategy, data, d_state=8, chunk_size=8)
    second = select_layers(teacher, 4, strategy, data, d_state=8, chunk_size=8)
    assert first == second and len(first.ssm_layers) == 4 and len(first.scores) == 6


def test_uniform_placement_keeps_one_attention_layer_per_bin():
    teacher = _teacher(n_layers=6)
    scores = {0: 9.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 5.0, 5: 1.0}  # importance alone would keep layers 0 and 4
    uniform = select_layers(teacher, 4, "uniform", scores=scores)
    kept = sorted(set(range(6)) - set(uniform.ssm_layers))
    assert kept == [0, 4]
    scores = {0: 9.0, 1: 8.0, 2: 7.0, 3: 1.0, 4: 1.0, 5: 1.0}
    assert sorted(set(range(6)) - set(select_layers(teacher, 4, "importance", scores=scores).ssm_layers)) == [0, 1]
    assert sorted(set(range(6)) - set(select_layers(teacher, 4, "uniform", scores=scores).ssm_layers)) == [0, 3]
    assert select_layers(teacher, 2, "first").ssm_layers == [0, 1]
    assert select_layers(teacher, 2, "last").ssm_layers == [4, 5]
    assert select_layers(teacher, 0, [2, 5]).ssm_layers == [2, 5]


def test_leave_one_out_scores_restore_the_model():
    teacher = _teacher()
    data = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        before = teacher(data)
    sel = select_layers(teacher, 2, "importance", data, score="leave_one_out")
    assert sel.score_kind == "leave_one_out" and all(v >= 0 for v in sel.scores.values())
    with torch.no_grad():
        assert torch.equal(teacher(data), before)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_progressive_conversion_keeps_trained_layers(family):
    teacher = _teacher(n_layers=4) if family == "llama" else _gemma_teacher()
    data = torch.randint(0, 61, (2, 12))
    seen = []

    def distil_stage(student, selection):
        seen.append((student.config.pattern, [n for n, p in student.named_parameters() if p.requires_grad]))
        with torch.no_grad():
            for i in selection.ssm_layers:
                student.layers[i].mamba.D.add_(1.0)  # stand-in for training: a visible change
        return student

    stages = convert_progressively(teacher, [1, 3], distil_stage, strategy="uniform", data=data, d_state=8,
                                   chunk_size=8, train_only_ssm=True)
    first, second = stages
    assert set(first.selection.ssm_layers) < set(second.selection.ssm_layers)
    kept = first.selection.ssm_layers[0]
    # The layer converted in stage 1 was "trained" twice; layers new in stage 2 once (calibrated MIL starts D at 0).
    assert torch.allclose(second.model.layers[kept].mamba.D, torch.full_like(second.model.layers[kept].mamba.D, 2.0))
    new = sorted(set(second.selection.ssm_layers) - {kept})[0]
    assert torch.allclose(second.model.layers[new].mamba.D, torch.full_like(second.model.layers[new].mamba.D, 1.0))
    assert all(name.startswith("layers.") and ".mamba." in name for name in seen[1][1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("ssm_layers", [[], [1, 2]])
def test_generation_with_kv_cache_and_ssm_state_matches_full_forward(ssm_layers, family):
    teacher = _teacher() if family == "llama" else _gemma_teacher()  # 13 tokens: past Gemma's window of 5
    model = hybridize(teacher, ssm_layers, chunk_size=8, init="mil_plain").eval()
    prompt = torch.randint(0, 61, (2, 7))
    out = generate(model, prompt, max_new_tokens=6)
    assert out.shape == (2, 13)
    with torch.no_grad():
        logits = model(out[:, :-1])
    # Greedy decoding: every generated token is the argmax of the full forward at its position.
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])


@pytest.mark.parametrize("capacity_margin", [5, -3])
def test_preallocated_kv_buffers_equal_concatenated_caches(capacity_margin):
    """Decoding into preallocated KV buffers gives the outputs of the concatenating cache; past the
    preallocated length it falls back to concatenation; the caller's earlier state is untouched."""
    from distil.models.state import preallocated_states
    from distil.models.transformer import KVBuffer

    torch.manual_seed(0)
    model = hybridize(_teacher(), [1], chunk_size=8, init="mil_plain").eval()
    prompt, new = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        ref_logits, ref_states = model(prompt, return_states=True)
        states = preallocated_states(model, 2, 7 + 8 + capacity_margin)
        logits, states = model(prompt, states=states, return_states=True)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        first_k = states[0][0].clone()
        for t in range(new.shape[1]):
            ref_logits, ref_states = model(new[:, t:t + 1], states=ref_states, return_states=True)
            logits, states = model(new[:, t:t + 1], states=states, return_states=True)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        assert isinstance(states[0], KVBuffer) == (capacity_margin >= 0)
        assert states[0][0].shape[2] == 15
        torch.testing.assert_close(states[0][0][:, :, :7], first_k, atol=0, rtol=0)


def test_training_a_hybrid_student_lowers_its_kl(tmp_path, tiny_tokenizer, tiny_corpus_file):
    from distil.config import config_from_dict
    from distil.data.dataset import build_data
    from distil.eval.perplexity import evaluate_lm
    from distil.teachers import ModelTeacher
    from distil.train.loop import train

    torch.manual_seed(0)
    teacher_model = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=48, n_layers=2, n_heads=4))
    teacher = ModelTeacher(teacher_model)
    cfg = config_from_dict({
        "teacher": {"source": "model", "path": "unused"},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {"steps": 15, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress": False, "val_every": 0},
    })
    data = build_data(cfg.data, tiny_tokenizer)
    student = hybridize(teacher_model, [1], init="random", d_state=8, chunk_size=16)
    before = evaluate_lm(student, data.val_windows, teacher=teacher)["kl_to_teacher"]
    result = train(cfg, tokenizer=tiny_tokenizer, data=data, teacher=teacher, student=student)
    assert result.val["kl_to_teacher"] < before


def test_mil_folds_qwen3_qk_norm_weights_into_c_and_b():
    """A q/k-normed attention (Qwen3): C and B take W_Q and W_K with the norm weights folded in."""
    torch.manual_seed(0)
    teacher = TransformerLM(ModelConfig(vocab_size=61, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True)).eval()
    attn = teacher.layers[1].self_attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    ssm = hybridize(teacher, [1], d_state=12, chunk_size=8, init="mil_plain").layers[1].mamba
    w, hd = ssm.in_proj.weight, 12
    b_off = 2 * ssm.d_inner
    c_off = b_off + 4 * 12
    for h in range(4):
        kv = h // 2
        torch.testing.assert_close(w[b_off + h * 12 : b_off + (h + 1) * 12],
                                   attn.k_proj.weight[kv * hd : (kv + 1) * hd] * attn.k_norm.weight[:, None])
        torch.testing.assert_close(w[c_off + h * 12 : c_off + (h + 1) * 12],
                                   attn.q_proj.weight[h * hd : (h + 1) * hd] * attn.q_norm.weight[:, None])
    calibrated = hybridize(teacher, [1], d_state=12, chunk_size=8, calibration=torch.randint(0, 61, (2, 16)))
    assert torch.isfinite(calibrated(torch.randint(0, 61, (2, 9)))).all()
    with pytest.raises(DistilError, match="no q/k norms"):
        from distil.models.export import granite_config_for

        granite_config_for(calibrated)


def test_gemma_like_hybrid_streams_in_pieces_and_reloads_exactly(tmp_path):
    """A Gemma-style hybrid (one sliding, one global layer converted): a sequence past the window in
    two pieces with carried state equals one pass; a native save reloads bit-exactly."""
    teacher = _gemma_teacher()
    calib = torch.randint(0, 61, (3, 16))
    hybrid = hybridize(teacher, [1, 3], d_state=8, chunk_size=8, calibration=calib).eval()
    assert hybrid.config.pattern == "AMAM" and hybrid.layers[1].rope_kind == "local"
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        whole = hybrid(ids)
        first, states = hybrid(ids[:, :6], return_states=True)
        rest = hybrid(ids[:, 6:], states=states)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-5, rtol=0)
    save_native(hybrid, tmp_path / "h")
    again = load(tmp_path / "h").eval()
    with torch.no_grad():
        assert torch.equal(again(ids), whole)


def test_mil_folds_gemma_one_plus_w_qk_norms():
    """Gemma's q/k norms scale by (1 + w): that factor, not w, goes into C and B."""
    teacher = _gemma_teacher()
    attn = teacher.layers[0].self_attn
    ssm = hybridize(teacher, [0], d_state=12, chunk_size=8, init="mil_plain").layers[0].mamba
    b_off, hd = 2 * ssm.d_inner, 12
    torch.testing.assert_close(ssm.in_proj.weight[b_off : b_off + hd],
                               attn.k_proj.weight[:hd] * (1 + attn.k_norm.weight)[:, None])


def test_gemma_like_hybrid_export_to_granite_is_refused_with_a_reason():
    from distil.models.export import granite_config_for

    hybrid = hybridize(_gemma_teacher(), [1], d_state=8, chunk_size=8, init="mil_plain")
    with pytest.raises(DistilError, match="GraniteMoeHybrid has no"):
        granite_config_for(hybrid)


@pytest.mark.parametrize("kind", ["gemma3", "qwen3", "kv_width", "discrete"])
def test_hybrids_no_stock_class_holds_export_with_their_own_code_and_equal_logits(tmp_path, kind):
    """`--format hf-remote`: transformers loads the folder with trust_remote_code=True, without distil,
    and gives distil's logits; the stock format refuses and names the way out."""
    from distil.models.export import export

    calib = torch.randint(0, 61, (3, 16))
    teacher = _gemma_teacher() if kind == "gemma3" else _teacher(qk_norm=kind == "qwen3")
    mixer = "discrete_mamba2" if kind == "discrete" else "mamba2"
    hybrid = hybridize(teacher, [1, 3], mixer=mixer, d_state=8, chunk_size=8, calibration=calib,
                       width="kv" if kind == "kv_width" else "heads").eval()
    with pytest.raises(DistilError, match="hf-remote"):
        export(hybrid, tmp_path / "stock", "hf")
    assert "DistilForCausalLM" in export(hybrid, tmp_path / "remote", "hf-remote")
    assert not any("distil." in line for f in (tmp_path / "remote").glob("*.py") for line in f.read_text().splitlines()
                   if line.startswith(("import", "from")))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True).eval()
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hybrid(ids))
        out = back.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, generate(hybrid, ids[:, :5], max_new_tokens=4))


def test_calibrated_mil_keeps_the_qk_norm_variant_closer_to_what_attention_adds():
    """With q/k norms, calibrated MIL builds the mixer with the norm weights folded into C and B and
    without, and keeps the one with the smaller replacement error on the calibration text, which is the
    local layer score on that text."""
    from distil.hybrid.mil import (
        _fresh_mixer,
        _mil_copy,
        calibrate,
        fresh_mil_mixer,
        replacement_error,
        ssm_settings,
    )
    from distil.hybrid.placement import layer_scores

    teacher = _gemma_teacher()
    with torch.no_grad():  # norm weights far from 1, so the two variants differ
        for layer in teacher.layers:
            layer.self_attn.q_norm.weight.uniform_(-0.9, 3.0)
            layer.self_attn.k_norm.weight.uniform_(-0.9, 3.0)
    data = torch.randint(0, 61, (4, 16))
    calib = calibrate(teacher, data, range(4))
    errors, choices = {}, {}
    for layer in range(4):
        mixer = fresh_mil_mixer(teacher, layer, "mamba2", calib[layer], d_state=8, chunk_size=8)
        variants = []
        for fold in (True, False):
            torch.manual_seed(0)
            settings = ssm_settings(teacher, "mamba2", d_state=8, expand=None, d_conv=4, chunk_size=8)
            m = _fresh_mixer("M", 48, settings, "cpu", torch.float32)
            _mil_copy(m, teacher.layers[layer].self_attn, teacher.config, calib[layer], fold_qk_norm=fold)
            variants.append(replacement_error(m, calib[layer]))
        errors[layer] = replacement_error(mixer, calib[layer])
        choices[layer] = mixer.qk_norm_weights
        assert errors[layer] == pytest.approx(min(variants), rel=1e-5), (layer, errors[layer], variants)
        assert choices[layer] == ("folded" if variants[0] <= variants[1] else "dropped")
    assert set(choices.values()) == {"folded", "dropped"}  # both branches taken here
    local = layer_scores(teacher, data, d_state=8, chunk_size=8)  # calibrated on the same text
    for layer in range(4):
        assert local[layer] == pytest.approx(errors[layer], rel=1e-4)
