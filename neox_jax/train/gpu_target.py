"""NVIDIA GPUs to compile for on a machine without one (`neox-jax plan --target`, bench/gpu_aot.py).

JAX compiles for a GPU it does not have when given a description of the card
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`): XLA's GPU
compiler runs here, with its own fusion and buffer assignment, so the memory analysis is the GPU's
(pythia-1.4b, remat none, micro-batch 24: 93.8 GiB planned, 95.1 GiB measured on an H200).  It
needs JAX's CUDA plugin of the running jax version (`jax-cuda12-plugin`, `jax-cuda12-pjrt`) and, to
trace cuDNN attention, cuDNN's library (`nvidia-cudnn-cu12`); no driver and no device.
`launch/setup.sh` installs them into VENV/gpu-target, apart from the environment (with the plugin
installed, JAX would look for a GPU at every start); NEOX_JAX_GPU_TARGET names another directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UserError

# gpu_device_info of each card (CUDA device properties; memory and bandwidth as sold)
CARDS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory=85_520_809_984, bandwidth=3.35e12),
    "h200": dict(name="NVIDIA H200", memory=150_754_820_096, bandwidth=4.8e12),
}


def target_config(card: str) -> str:
    """XLA's GpuTargetConfig (text proto) of an H100 / H200 (sm_90, 132 SMs)."""
    c = CARDS[card]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(c['bandwidth'])}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {c['memory']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 7
}}
runtime_version {{
  major: 12
  minor: 8
}}
device_description_str: "{c['name']}"
"""


def packages_dir() -> Path:
    return Path(os.environ.get("NEOX_JAX_GPU_TARGET") or Path(sys.prefix) / "gpu-target")


def use_packages() -> None:
    """Put packages_dir() on the import path and start JAX on the CPU (before jax is imported: it
    looks for the CUDA plugin's cuDNN bindings when it loads).  The plugin's C++ start-up lines ("Could
    not find cuda drivers", printed before logging is set up, so no log level filters them) are kept
    off stderr; Python errors still surface."""
    where = packages_dir()
    if "jax" in sys.modules:
        raise RuntimeError("gpu_target.use_packages() must run before jax is imported")
    if where.is_dir() and str(where) not in sys.path:
        sys.path.insert(0, str(where))
    sys.stderr.flush()
    saved, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    try:
        import jax

        jax.config.update("jax_platforms", "cpu")  # the host runs the compiler; no GPU is looked for
        jax.devices("cpu")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(quiet)


def devices(card: str, count: int, nodes: int = 1) -> list:
    """`count` devices of `card` on `nodes` hosts (count / nodes each, in host order), to compile for
    (after `use_packages`, unless the CUDA plugin is installed in the environment)."""
    if card not in CARDS:
        raise UserError(f"--target {card!r}: one of {', '.join(sorted(CARDS))}")
    if count % nodes:
        raise UserError(f"mesh: {count} devices do not split into {nodes} nodes")
    where = packages_dir()
    import jax
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(card),
                                            topology=f"1x{nodes}x{count // nodes}")
    except Exception as e:  # noqa: BLE001  (no CUDA plugin: one line saying what to install)
        raise UserError(f"--target {card}: no CUDA compiler ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"install jax-cuda12-plugin=={jax.__version__}, jax-cuda12-pjrt=={jax.__version__} and "
                        f"nvidia-cudnn-cu12 (launch/setup.sh puts them in {where})") from None
    return list(topo.devices)
