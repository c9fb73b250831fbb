"""CUDA paths: kernels against the reference, fused loss on the GPU, bf16 training. Skipped without CUDA."""

import pytest
import torch

from distil import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The scan and step kernels are mamba_ssm's; causal_conv1d's convolution joins in when it is installed.
needs_kernels = pytest.mark.skipif(not kernels.installed("mamba_ssm"), reason="needs mamba_ssm (pip install -e '.[gpu]')")


@cuda
@needs_kernels
def test_mamba2_kernels_match_the_reference():
    from distil.models import Mamba2Mixer

    torch.manual_seed(0)
    mixer = Mamba2Mixer(256, d_state=16, expand=2, head_dim=64, n_groups=4, chunk_size=64).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    try:
        kernels.force("reference")
        ref, ref_state = mixer(x)
        kernels.force("fast")
        fast, fast_state = mixer(x)
        # Carried state through the kernels too.
        first, state = mixer(x[:, :150])
        second, _ = mixer(x[:, 150:], state=state)
    finally:
        kernels.force(None)
    torch.testing.assert_close(fast, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fast_state.ssm, ref_state.ssm, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=2e-3, rtol=2e-3)


@cuda
@needs_kernels
def test_mamba2_kernel_gradients_match_the_reference():
    from distil.models import Mamba2Mixer

    torch.manual_seed(0)
    mixer = Mamba2Mixer(128, d_state=16, expand=2, head_dim=32, n_groups=2, chunk_size=64).cuda()
    x = torch.randn(2, 200, 128, device="cuda", requires_grad=True)
    grads = {}
    try:
        for mode in ("reference", "fast"):
            kernels.force(mode)
            out, _ = mixer(x)
            loss = (out * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum()
            grads[mode] = torch.autograd.grad(loss, [x, *mixer.parameters()])
    finally:
        kernels.force(None)
    for name, a, b in zip(["x", *dict(mixer.named_parameters())], grads["fast"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3, msg=lambda m, name=name: f"{name}: {m}")


@cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_kernel_step_matches_forward(dtype):
    from distil.models import Mamba2Mixer

    torch.manual_seed(0)
    mixer = Mamba2Mixer(128, d_state=16, expand=2, head_dim=32, n_groups=2, chunk_size=64).cuda().to(dtype)
    x = torch.randn(3, 40, 128, device="cuda").to(dtype)
    try:
        kernels.force("reference")
        whole, _ = mixer(x)
        kernels.force("fast")
        _, state = mixer(x[:, :32])
        conv_before, ssm_before = state.conv.clone(), state.ssm.clone()
        steps = []
        for t in range(32, 40):
            y, new_state = mixer.step(x[:, t], state)
            if t == 32:  # the kernels update in place: the caller's state must be left as it was
                torch.testing.assert_close(state.conv, conv_before, atol=0, rtol=0)
                torch.testing.assert_close(state.ssm, ssm_before, atol=0, rtol=0)
            steps.append(y)
            state = new_state
    finally:
        kernels.force(None)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(torch.stack(steps, 1).float(), whole[:, 32:].float(), **tol)


@cuda
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_matches_materialised(dtype, kind):
    """On CUDA the chunk runs through torch.compile (kernels dispatch "compile"); it must equal the
    materialised loss, with a mask, CE on labels, a temperature and a last chunk of another size."""
    from distil.losses import cross_entropy, fused_linear_kd_loss, kd_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    th = torch.randn(1000, 256, device="cuda", generator=g).to(dtype)
    tw = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).to(dtype)
    mask = torch.rand(1000, device="cuda", generator=g) > 0.2
    labels = torch.randint(0, 32000, (1000,), device="cuda", generator=g)
    logits = h @ w.t()
    ref = kd_loss(logits, th @ tw.t(), kind, mask=mask, temperature=2.0) + 0.5 * cross_entropy(logits, labels, mask=mask)
    ref_grads = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_kd_loss(h, w, th, tw, kind=kind, chunk_size=300, mask=mask, labels=labels, ce_weight=0.5,
                                 temperature=2.0)
    grads = torch.autograd.grad(fused, (h, w))
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@cuda
def test_bf16_training_steps_run_and_learn(tmp_path, tiny_tokenizer, tiny_corpus_file):
    from distil.config import config_from_dict
    from distil.models import ModelConfig, TransformerLM
    from distil.teachers import ModelTeacher
    from distil.train.loop import train

    torch.manual_seed(0)
    teacher = ModelTeacher(TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=64, n_layers=2, n_heads=2)))
    cfg = config_from_dict({
        "teacher": {"source": "model", "path": "unused"},
        "student": {"d_model": 64, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2, "token_cache": None},
        "loss": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.5},
        "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "device": "cuda", "dtype": "bfloat16", "progress": False,
                  "val_every": 0},
    })
    result = train(cfg, tokenizer=tiny_tokenizer, teacher=teacher)
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@cuda
def test_compiled_student_trains_like_eager():
    from distil.config import TrainConfig
    from distil.models import ModelConfig, TransformerLM
    from distil.train.distributed import DistInfo, parallelize

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=2)).cuda()
    ids = torch.randint(0, 100, (2, 32), device="cuda")
    eager = model(ids)
    compiled = parallelize(model, TrainConfig(compile=True), DistInfo(device=torch.device("cuda")))
    torch.testing.assert_close(compiled(ids), eager, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("packing", ["concat", "stream"])
def test_bf16_hybrid_training_on_cuda(tmp_path, tiny_tokenizer, tiny_corpus_file, packing):
    """A 50% Mamba2 hybrid distils in bf16 on CUDA (through the kernels when installed), with
    reverse KL, also with streamed batches that carry the SSM state."""
    from distil.config import config_from_dict
    from distil.hybrid import hybridize
    from distil.models import ModelConfig, TransformerLM
    from distil.teachers import ModelTeacher
    from distil.train.loop import train

    torch.manual_seed(0)
    base = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=64, n_layers=2, n_heads=2))
    student = hybridize(base, [1], d_state=16, init="mil_plain")
    cfg = config_from_dict({
        "teacher": {"source": "model", "path": "unused"},
        "student": {"d_model": 64, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2, "token_cache": None,
                 "packing": packing},
        "loss": {"kind": "reverse_kl", "kd_weight": 1.0},
        "train": {"steps": 15, "batch_size": 4, "lr": 3e-3, "device": "cuda", "dtype": "bfloat16", "progress": False,
                  "val_every": 0},
    })
    result = train(cfg, tokenizer=tiny_tokenizer, teacher=ModelTeacher(base), student=student)
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
