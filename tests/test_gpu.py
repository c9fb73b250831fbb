"""CUDA paths: kernels against the reference, fused loss on the GPU, bf16 training. Skipped without CUDA."""

import pytest
import torch

from distil import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.skipif(not (kernels.installed("mamba_ssm") and kernels.installed("causal_conv1d")),
                    reason="needs mamba_ssm and causal_conv1d (pip install -e '.[gpu]')")
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_matches_materialised(dtype):
    from distil.losses import fused_linear_kd_loss, kd_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    th = torch.randn(1000, 256, device="cuda", generator=g).to(dtype)
    tw = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).to(dtype)
    ref = kd_loss(h @ w.t(), th @ tw.t(), "reverse_kl")
    ref_grads = torch.autograd.grad(ref, (h, w))
    fused = fused_linear_kd_loss(h, w, th, tw, kind="reverse_kl", chunk_size=300)
    grads = torch.autograd.grad(fused, (h, w))
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@cuda
def test_bf16_training_steps_run_and_learn(tmp_path, tiny_tokenizer, tiny_corpus_file):
    from distil.config import config_from_dict
    from distil.models import ModelConfig, TransformerLM
    from distil.train.loop import train
    from distil.train.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher(TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=64, n_layers=2, n_heads=2)),
                      native=True)
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
