"""GPT-NeoX side of check_gpt_neox.sh: runs GPT-NeoX's own code (megatron.*, DeeperSpeed) on CPU, one
process per tensor-parallel rank over torch.distributed gloo (launched with torch.distributed.run).

  load --yml Y... --load DIR --tokens T --out LOGITS [--rename-mlp] [--no-load-rng]
      GPT-NeoX's inference set-up (megatron.utils.setup_for_inference_or_eval's overrides, then
      megatron.training.setup_model_and_optimizer: GPT2ModelPipe, deepspeed.initialize, and
      megatron.checkpointing.load_checkpoint -> DeepSpeed PipelineEngine.load_checkpoint), then a
      forward of GPT2ModelPipe in inference mode (logits gathered over TP ranks); rank 0 saves them.
  save --yml Y... --save DIR --tokens T --out LOGITS [--perturb]
      the same model randomly initialised by GPT-NeoX's own init functions (use_cpu_initialization:
      _initialize_affine_weight_cpu, the master weight split over ranks), optionally perturbed, written
      with megatron.checkpointing.save_checkpoint (DeepSpeed engine.save_checkpoint: PipelineModule
      layer_LL-model_TT-model_states.pt + mp_rank_TT_model_states.pt, and GPT-NeoX's configs/ copy),
      and its forward logits saved.

Run from the GPT-NeoX checkout (it must be importable as `megatron`).  CPU shims, all stated:
  * torch.cuda.current_device -> "cpu"  (GPT-NeoX allocates the attention score buffer with
    device=torch.cuda.current_device(); no CUDA in this torch build)
  * Tensor.cuda(...) -> the tensor itself (megatron.utils.get_total_params moves a count to the GPU)
  * torch.cuda.get_rng_state -> torch.get_rng_state, torch.cuda.set_rng_state -> no-op
    (save_ds_checkpoint / load_checkpoint store and restore a CUDA RNG state)
  * FusedAdam.refresh_fp32_params -> no-op (fp32 without ZeRO: DeepSpeed calls it on the bare optimizer
    when loading module-only; there is no fp32 master copy to refresh)
  * mpu is initialised here (megatron.initialize._initialize_distributed only does it when
    torch.cuda.device_count() > 0) with the same PipeModelDataParallelTopology, and the
    model-parallel RNG tracker seeded (_set_random_seed likewise skips it without CUDA).
"""

from __future__ import annotations

import argparse
import os
import zlib

import numpy as np
import torch

# --------------------------------------------------------------------------- CPU shims
torch.cuda.current_device = lambda: "cpu"
torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
torch.cuda.set_rng_state = lambda *a, **k: None
torch.Tensor.cuda = lambda self, *a, **k: self  # e.g. megatron.utils.get_total_params: tensor.cuda(...)


def _shim_optimizer():
    # DeepSpeed's engine._load_checkpoint(load_module_only=True) calls optimizer.refresh_fp32_params(),
    # which only FP16_Optimizer/ZeRO wrappers have; in fp32 without ZeRO the client FusedAdam is used bare
    # and has no fp32 master copy to refresh, so a no-op is the exact semantics.
    from deepspeed.ops.adam import FusedAdam

    if not hasattr(FusedAdam, "refresh_fp32_params"):
        FusedAdam.refresh_fp32_params = lambda self: None


def log(*a):
    print(f"[rank {os.environ.get('RANK', '?')}]", *a, flush=True)


def build_args(ymls, overrides):
    from megatron.neox_arguments import NeoXArgs

    neox_args = NeoXArgs.from_ymls(ymls, overwrite_values=overrides)
    neox_args.configure_distributed_args()
    neox_args.build_tokenizer()  # sets padded_vocab_size from the tokenizer, as GPT-NeoX does
    return neox_args


def init_distributed(neox_args):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron import mpu
    from megatron.initialize import initialize_megatron

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    pp = max(neox_args.pipe_parallel_size, 1)
    mp = max(neox_args.model_parallel_size, 1)
    dp = neox_args.world_size // (pp * mp)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=mp, num_dp=dp)
    mpu.initialize_model_parallel(mp, topology=topo, fp32_allreduce=neox_args.fp32_allreduce)
    initialize_megatron(neox_args, allow_no_cuda=True)  # sees torch.distributed initialised
    mpu.model_parallel_cuda_manual_seed(neox_args.seed)


def forward(model, neox_args, tokens_path):
    from megatron.utils import get_ltor_masks_and_position_ids

    ids = torch.from_numpy(np.load(tokens_path)).long()
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(ids, neox_args.tokenizer.eod)
    module = model.module
    module.inference_mode(use_cache=False)  # parallel_output False: logits gathered over TP ranks
    module.eval()
    with torch.no_grad():
        out = module((ids, position_ids, attention_mask))
    if isinstance(out, tuple):
        out = out[0]
    if out.shape[-1] != neox_args.padded_vocab_size:
        # tied embeddings: GPT2ModelPipe._logits_helper uses the model's construction-time
        # parallel_output (True), which inference_mode() does not change (it only reaches
        # ParallelLinearPipe), so each rank holds its vocabulary slice: gather them here.
        from megatron import mpu

        log(f"logits are vocab-parallel ({out.shape[-1]} of {neox_args.padded_vocab_size}): gathering over TP ranks")
        out = mpu.gather_from_model_parallel_region(out.contiguous())
    return out.float().numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["load", "save"])
    ap.add_argument("--yml", nargs="+", required=True)
    ap.add_argument("--load")
    ap.add_argument("--save")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-load-rng", action="store_true")
    ap.add_argument("--perturb", action="store_true")
    ap.add_argument("--iteration", type=int, default=100)
    a = ap.parse_args()

    # the overrides megatron.utils.setup_for_inference_or_eval applies, plus CPU/fp32/no-dropout ones
    overrides = {
        "checkpoint_activations": False,
        "partition_activations": False,
        "no_load_optim": True,
        "optimizer": None,
        "zero_optimization": None,
        "use_cpu_initialization": True,
        "distributed_backend": "gloo",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "seed": 1234,
        "train_iters": 1,  # the LR scheduler GPT-NeoX always builds needs it (training YAMLs have it)
        # deepy.py's launcher normally derives this from the hostfile / GPU count (0 here)
        "global_num_gpus": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if a.mode == "load":
        overrides["load"] = a.load
        if a.no_load_rng:
            overrides["no_load_rng"] = True
    else:
        overrides["save"] = a.save
        overrides["load"] = None
    neox_args = build_args(a.yml, overrides)
    init_distributed(neox_args)
    _shim_optimizer()

    from megatron import mpu
    from megatron.checkpointing import save_checkpoint
    from megatron.training import setup_model_and_optimizer

    # (model, optimizer, lr_scheduler[, reference_model]): 3 values before GPT-NeoX added DPO/KTO in late 2024
    model, optimizer, lr_scheduler = setup_model_and_optimizer(neox_args=neox_args, use_cache=False)[:3]
    log(f"engine {type(model).__name__}, module {type(model.module).__name__}, "
        f"iteration after load {neox_args.iteration}")
    rank = torch.distributed.get_rank()
    if a.mode == "save":
        if a.perturb:
            # GPT-NeoX's init leaves biases at 0 and LayerNorms at (1, 0), which would hide any bias or
            # norm mix-up.  Add noise: the same on every TP rank for replicated parameters (as training
            # keeps them: identical gradients on every rank), rank-specific for partitioned ones.
            with torch.no_grad():
                for name, p in model.module.named_parameters():
                    partitioned = getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False)
                    seed = zlib.crc32(name.encode()) * 4 + (mpu.get_model_parallel_rank() if partitioned else 0)
                    g = torch.Generator().manual_seed(seed)
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                    if name.endswith("bias") or "norm" in name:
                        p.add_(noise * 0.1)
                    else:
                        p.add_(noise * 0.02)
        save_checkpoint(neox_args=neox_args, iteration=a.iteration, model=model, optimizer=optimizer,
                        lr_scheduler=lr_scheduler)
        log("saved", a.save)
    logits = forward(model, neox_args, a.tokens)
    if rank == 0:
        np.save(a.out, logits)
        log("logits", logits.shape, "->", a.out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
