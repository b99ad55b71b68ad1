# XLA GPU flags for the training-throughput lever "XLA flags" (issue 12), one per line, each with why.
# Versioned on purpose: change a line, rerun, and write the prediction and the number into
# bench/throughput_notes.md.  Checked to be known flags of jaxlib 0.10.2 (an unknown flag makes XLA
# abort at start-up, which tests/bench_train_throughput_test.py checks against the installed jaxlib);
# the GPU machine has jax 0.11, so the first GPU run is also the check that they still exist there.
#
# Use either way:
#   source bench/xla_gpu_flags.sh && python bench/train_throughput.py ...      (exports XLA_FLAGS)
#   python bench/train_throughput.py --xla-flags-file bench/xla_gpu_flags.sh  (JAX jobs only; the
#                                                                               PyTorch side never sees them)
XLA_GPU_FLAGS=(
  # Schedule independent work (async copies, the CE chunks' loop, future collectives) to overlap
  # instead of running in program order.  Default-on in recent XLA; pinned so the run says what it used.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Plain GEMMs through cuBLAS instead of Triton-generated kernels.  The 1.4B matmuls are large
  # (2048 x 8192 x 16384 tokens), where cuBLAS is usually at least as fast, and autotuning time drops.
  --xla_gpu_enable_triton_gemm=false
  # cuBLASLt GEMMs, whose epilogues can absorb the bias add (and GELU) after each projection,
  # saving one read+write of a [B, S, 4D] activation per MLP.
  --xla_gpu_enable_cublaslt=true
  # Run async work (e.g. copies, collectives on multi-GPU) on the highest-priority stream so it is
  # not starved by compute kernels.  Expected to matter little on one GPU; kept for multi-GPU runs.
  --xla_gpu_enable_highest_priority_async_stream=true
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${XLA_GPU_FLAGS[*]}"
