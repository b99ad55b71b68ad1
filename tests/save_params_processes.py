"""`python tests/save_params_processes.py DST SEED`: as one of two jax.distributed processes (the
NEOX_JAX_* variables that tests/processes.py sets), initialise the tiny model with SEED sharded over
all 8 global devices (fsdp: each process holds half of every sharded tensor) and write it to DST with
`checkpoint.save_params`, every process writing its own shards.  For tests/multiprocess_test.py."""
import sys

from neox_jax import distributed

distributed.initialize(distributed.resolve())

from neox_jax.checkpoint import save_params  # noqa: E402
from neox_jax.config import load_config  # noqa: E402
from neox_jax.model import init_params  # noqa: E402
from neox_jax.sharding import make_mesh  # noqa: E402

cfg = load_config("tiny")
seed = int(sys.argv[2])
save_params(sys.argv[1], cfg, init_params(cfg, seed, mesh=make_mesh(data=1, fsdp=-1, tensor=1)), seed=seed)
