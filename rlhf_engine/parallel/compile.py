"""``torch.compile`` of each decoder layer (``parallel.compile_layers``), the per-block compilation that
torchtitan uses and torchao's float8 training needs to be fast.

    compile_decoder_layers(model)   # after FP8, tensor parallelism and activation checkpointing, before FSDP

Why per layer: the layers are alike, so one compiled graph serves all of them (dynamo guards a module's
parameters by shape and dtype, not identity), compilation costs one layer's time, and FSDP2 still shards
and prefetches layer by layer around the compiled blocks. A checkpointed layer compiles with its
recomputation.

Why it matters for FP8: torchao's float8 linears compute each operand's amax, scale and cast as separate
kernels; eagerly that costs more than the FP8 GEMM saves. Measured on one H200 (``bench_fp8 --steps 30``,
a 1.16B Llama-shaped model, 4 x 2048 tokens, bf16 compute; ``benchmarks/results/fp8_nvidia_h200*.csv``):

    step ms        eager   layers compiled
    bf16           163.7   118.0
    torchao FP8    382.4   103.9          (eager: 0.43x bf16; compiled: 1.14x compiled bf16, 1.57x eager bf16)

So ``compile_layers`` defaults to on exactly there: torchao FP8 on a CUDA device. Elsewhere it is opt-in.

Generation runs the layers eagerly (``rollout.sampling`` under ``torch.compiler.set_stance("force_eager")``
for its prompt passes): its shapes change every call, and ``rollout.decode_mode`` owns the decode step's
compilation.
"""

from __future__ import annotations

from torch import nn

from .fsdp import decoder_parts


def compile_decoder_layers(model: nn.Module) -> nn.Module:
    """Compile every decoder layer of ``model`` (Transformer, role or score model) in place."""
    for part in decoder_parts(model):
        for layer in part.layers.values():
            layer.compile()
    return model


def wants_compiled_layers(setting: bool | None, fp8, device_type: str) -> bool:
    """``parallel.compile_layers`` resolved: None means on for torchao FP8 on CUDA (module docstring)."""
    if setting is not None:
        return setting
    return fp8 is not None and fp8.backend == "torchao" and device_type == "cuda"
