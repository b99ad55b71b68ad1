# XLA, NCCL and JAX settings for GPU training, one per line, each with why and where the number came
# from.  Sourced by launch/local.sh, launch/slurm.sbatch and launch/k8s-jobset.yaml (and by
# bench/train_throughput.py --xla-flags-file).  Versioned on purpose: change a line, rerun, and write
# the prediction and the number into bench/throughput_notes.md.  Every --xla_* flag is checked to be
# known to the installed jaxlib (an unknown flag makes XLA abort at start-up), by
# tests/bench_train_throughput_test.py; the GPU machine has jax 0.11, where the first run is the check.
#
# Use either way:
#   source launch/xla_gpu_flags.sh && python bench/train_throughput.py ...      (exports XLA_FLAGS)
#   python bench/train_throughput.py --xla-flags-file launch/xla_gpu_flags.sh  (JAX jobs only; the
#                                                                               PyTorch side never sees them)
# Measured on an H200 (jax 0.11.2, pythia-1.4b train step, bench/throughput_notes.md lever 5,
# 2026-11-26): the four flags below together made the step 7.9% SLOWER (47.7k vs 51.7k tokens/s), so
# none is active.  Measured alone on 2026-11-27 (same card and step, 53.3k tokens/s without flags;
# step times spread +-3%): latency-hiding scheduler 53.2k, triton_gemm=false 48.4k (-9.1%: the whole
# loss), cuBLASLt 53.5k; highest-priority stream not measured.  None helps, so none is enabled.
XLA_GPU_FLAGS=(
  # Schedule independent work (async copies, the CE chunks' loop, collectives) to overlap instead of
  # running in program order.  Default-on in recent XLA.
  # --xla_gpu_enable_latency_hiding_scheduler=true
  # Plain GEMMs through cuBLAS instead of Triton-generated kernels.  -9.1%: do not enable.
  # --xla_gpu_enable_triton_gemm=false
  # cuBLASLt GEMMs, whose epilogues can absorb the bias add (and GELU) after each projection.
  # --xla_gpu_enable_cublaslt=true
  # Run async work (copies, collectives on multi-GPU) on the highest-priority stream.
  # --xla_gpu_enable_highest_priority_async_stream=true
)
if ((${#XLA_GPU_FLAGS[@]})); then export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${XLA_GPU_FLAGS[*]}"; fi

# ---- JAX's GPU memory: XLA's allocator takes this fraction of each GPU at start-up (JAX's default is
# 0.75, documented under "GPU memory allocation").  Training wants the memory that `neox-jax plan`
# counted (peak estimate), so take 90% and leave the rest to CUDA/cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# ---- NCCL (only read by multi-GPU runs)
# Warnings and errors only (INFO prints every ring and channel at start-up; set INFO to debug topology).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Cluster-specific, so not set here; the usual ones to look at on an InfiniBand cluster:
#   NCCL_SOCKET_IFNAME   the interface of the bootstrap network (e.g. ib0 or eth0)
#   NCCL_IB_HCA          which HCAs NCCL uses (e.g. mlx5_0,mlx5_1,...)
#   NCCL_CROSS_NIC=0     keep each ring on one NIC per rail on rail-optimised fabrics
