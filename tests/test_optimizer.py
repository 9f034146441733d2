"""AdamW with fp32 master weights (``rlhf_engine/optimizer.py``), against torch.optim.AdamW as the oracle:
equal on fp32 parameters; on bf16 parameters the masters follow fp32 AdamW exactly and the weights are
their rounding, where AdamW on the bf16 weights loses most updates; chosen by ``build_optimizer`` for a bf16
model; masters saved and restored by checkpoints, so a resumed run continues exactly."""

import pytest
import torch
from torch import nn

from rlhf_engine.optimizer import MasterWeightAdamW


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter((torch.randn(64, 32, generator=g) * 0.02).to(dtype)),
            nn.Parameter((1 + 0.1 * torch.randn(32, generator=g)).to(dtype))]


def _groups(params, lr):  # two groups, one decayed, with their own rates
    return [{"params": params[:1], "weight_decay": 0.1, "lr": lr}, {"params": params[1:], "weight_decay": 0.0,
                                                                   "lr": 3 * lr}]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()
        opt.zero_grad()


def test_fp32_parameters_update_exactly_as_torch_fused_adamw():
    ours, ref = _params(torch.float32), _params(torch.float32)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _run(MasterWeightAdamW(_groups(ours, 1e-2), **kw), ours, 7)
    _run(torch.optim.AdamW(_groups(ref, 1e-2), fused=True, **kw), ref, 7)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_bf16_parameters_keep_fp32_masters_that_follow_fp32_adamw():
    lr, steps = 1e-5, 10
    ours = _params(torch.bfloat16)
    opt = MasterWeightAdamW(_groups(ours, lr), lr=lr, betas=(0.9, 0.999))
    _run(opt, ours, steps)
    ref = [nn.Parameter(p.float()) for p in _params(torch.bfloat16)]  # the same start, in fp32
    ref_opt = torch.optim.AdamW(_groups(ref, lr), lr=lr, betas=(0.9, 0.999), fused=True)
    for t in range(steps):  # the bf16 gradients, upcast
        for p, g in zip(ref, _grads(t, ours)):
            p.grad = g.float()
        ref_opt.step()
    for p, r in zip(ours, ref):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, r)
        assert p.dtype == torch.bfloat16 and torch.equal(p, r.to(torch.bfloat16))
    # AdamW on the bf16 weights themselves rounds most of these updates away
    plain = _params(torch.bfloat16)
    _run(torch.optim.AdamW(_groups(plain, lr), lr=lr, betas=(0.9, 0.999)), plain, steps)
    start = _params(torch.bfloat16)
    changed = lambda ps: sum(int((p != s).sum()) for p, s in zip(ps, start)) / sum(p.numel() for p in ps)  # noqa: E731
    assert changed(ours) > 2 * changed(plain), (changed(plain), changed(ours))  # measured: 0.41 against 0.15


def test_build_optimizer_gives_bf16_models_master_weights():
    from rlhf_engine.config import OptimConfig
    from rlhf_engine.trainer import build_optimizer

    cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    assert type(build_optimizer(model, cfg)) is torch.optim.AdamW
    opt = build_optimizer(model.to(torch.bfloat16), cfg)
    assert type(opt) is MasterWeightAdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # norms and biases not decayed


def test_masters_are_checkpointed_and_a_resumed_run_continues_exactly(tmp_path):
    from rlhf_engine.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)).to(torch.bfloat16)
        return model, MasterWeightAdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    full, full_opt = build()
    _run(full_opt, list(full.parameters()), 6)
    cut, cut_opt = build()
    _run(cut_opt, list(cut.parameters()), 3)
    save_checkpoint(tmp_path, 3, cut, cut_opt)
    resumed, resumed_opt = build()
    load_checkpoint(latest_checkpoint(tmp_path), resumed, resumed_opt)
    for p, q in zip(resumed.parameters(), cut.parameters()):
        for key in ("master", "exp_avg", "exp_avg_sq"):  # fp32, not the bf16 rounding
            assert resumed_opt.state[p][key].dtype == torch.float32
            assert torch.equal(resumed_opt.state[p][key], cut_opt.state[q][key])
        assert float(resumed_opt.state[p]["step"]) == 3
    _run(resumed_opt, list(resumed.parameters()), 3, first=3)
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q) and torch.equal(resumed_opt.state[p]["master"], full_opt.state[q]["master"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_detected(dtype):
    from rlhf_engine.optimizer import has_low_precision

    assert has_low_precision(_params(dtype)) and not has_low_precision(_params(torch.float32))


def _tensor_parallel_body():  # bf16 weights sharded by rows (DTensor), against one process
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = _params(torch.bfloat16)
    whole = MasterWeightAdamW(_groups(full, 1e-5), lr=1e-5)
    _run(whole, full, 5)
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in _params(torch.bfloat16)]
    opt = MasterWeightAdamW(_groups(sharded, 1e-5), lr=1e-5)
    for t in range(5):
        for p, g in zip(sharded, _grads(t, sharded)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
        opt.zero_grad()
    for p, q in zip(sharded, full):
        assert torch.equal(opt.state[p]["master"].full_tensor(), whole.state[q]["master"])
        assert torch.equal(p.full_tensor(), q)


@pytest.mark.dist
def test_tensor_parallel_shards_keep_their_masters():
    """Tensor parallelism alone (no FSDP): DTensor shards get fp32 masters of their own, equal to the
    shards of one process's masters, and are rounded back in place."""
    from torchrun_helper import torchrun

    torchrun(_tensor_parallel_body, nproc=2)


def test_bf16_gradients_accumulate_over_micro_batches_in_fp32():
    """parallel/grads.py: with MasterWeightAdamW each backward's bf16 gradient goes into an fp32 main_grad,
    so 32 micro-batches sum to the fp64 sum of their bf16 gradients up to fp32 rounding, where autograd's
    own bf16 accumulation (the oracle's counterpart without the optimizer) is off by bf16 roundings."""
    from rlhf_engine.parallel.grads import grad_of

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 40, generator=g) * 0.05).to(torch.bfloat16)
    xs = [torch.randn(16, 40, generator=g).to(torch.bfloat16) for _ in range(32)]
    ups = [torch.randn(16, 48, generator=g).to(torch.bfloat16) * (0.1 + i) for i in range(32)]  # growing sizes

    def accumulate(param):
        for x, up in zip(xs, ups):
            ((x @ param.T) * up).sum().backward()

    ours, plain = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    opt = MasterWeightAdamW([ours], lr=1e-3)
    accumulate(ours)
    accumulate(plain)
    exact = torch.zeros(48, 40, dtype=torch.float64)
    for x, up in zip(xs, ups):  # each micro-batch's bf16 gradient, summed in fp64
        one = nn.Parameter(weight.clone())
        ((x @ one.T) * up).sum().backward()
        exact += one.grad.double()
    assert ours.grad is None and grad_of(ours).dtype == torch.float32
    scale = exact.abs().max()
    ours_err = (grad_of(ours).double() - exact).abs().max() / scale
    plain_err = (plain.grad.double() - exact).abs().max() / scale
    assert ours_err < 1e-6 and plain_err > 1e-3, (ours_err, plain_err)
    opt.step()  # the update reads main_grad; zero_grad clears it
    assert opt.state[ours]["master"].dtype == torch.float32
    opt.zero_grad()
    assert grad_of(ours) is None


def test_clipping_reads_the_fp32_main_grads():
    """trainer.clip_grad_norm on main_grads: the norm of the fp32 sum, and the scaling applied to it."""
    from rlhf_engine.parallel.grads import grad_of
    from rlhf_engine.trainer import clip_grad_norm

    params = _params(torch.bfloat16)
    MasterWeightAdamW(_groups(params, 1e-3), lr=1e-3)
    for t in range(3):
        sum(((p.float() * g.float()).sum() for p, g in zip(params, _grads(t, params)))).backward()
    grads = [grad_of(p).clone() for p in params]
    want = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    total = clip_grad_norm(params, 1.0)
    assert total == pytest.approx(float(want), rel=1e-6)
    for p, g in zip(params, grads):
        assert p.grad is None and torch.allclose(grad_of(p), g * (1.0 / (float(want) + 1e-6)), rtol=1e-6)
