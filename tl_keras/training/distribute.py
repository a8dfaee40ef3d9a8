"""Choosing a tf.distribute strategy and what follows from it: precision, and who writes files.

Training code only ever sees the strategy object; scaling out is TensorFlow's own engine.
"""

import json
import os
import tempfile

from absl import logging
import tensorflow as tf

from tl_keras.errors import UserError, first_line


def get_strategy(name: str = "auto", num_gpus: int | None = None, tpu: str | None = None,
                 devices=None) -> tf.distribute.Strategy:
    """Return the strategy for `name`; call it before building any dataset or model.

    auto picks MirroredStrategy only with more than one GPU, since one replica gains nothing from it.
    `devices` restricts mirrored to those devices (tests mirror over logical CPUs); `num_gpus` to
    the first N GPUs. multi_worker reads the cluster from the TF_CONFIG environment variable.
    """
    if name == "multi_worker":
        # Collective ops must be configured before anything initialises the runtime, so this comes
        # before even listing devices.
        if "TF_CONFIG" not in os.environ:
            raise UserError("--distribution_strategy=multi_worker needs the cluster in the TF_CONFIG "
                            "environment variable (see README). Received: distribution_strategy=multi_worker")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        logging.info("Strategy MultiWorkerMirroredStrategy with %d replica(s).",
                     strategy.num_replicas_in_sync)
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    elif name == "mirrored":
        if devices is None and num_gpus is not None:
            if num_gpus > len(gpus):
                raise UserError(f"--num_gpus asks for more GPUs than the {len(gpus)} visible. "
                                f"Received: num_gpus={num_gpus}")
            devices = [gpu.name for gpu in gpus[:num_gpus]] or None
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise UserError(f"No TPU found ({first_line(e)}). "
                            f"Received: tpu={tpu}") from None
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise UserError(f"Unknown distribution strategy. Received: distribution_strategy={name}")
    logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    return strategy


def check_batch_size(batch_size: int, strategy: tf.distribute.Strategy):
    """The global batch must split evenly, or replicas would see different batch sizes."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(
            f"--batch_size is global and must be divisible by the {replicas} replicas. "
            f"Received: batch_size={batch_size}"
        )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: always, except a non-chief multi-worker task."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)


def worker_model_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """The chief writes to model_dir; other workers to a private temporary directory, as TF's
    multi-worker guide prescribes (they must still save, since saving can involve collectives)."""
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"tl_keras_{resolver.task_type}{resolver.task_id}_")


# Linux /proc/cpuinfo flags that give bf16 matrix units (Intel AMX). AVX512_BF16 alone only converts
# and dots vectors, which on measured CPUs makes bf16 slower than float32 (README, "bf16 on CPUs").
AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    """(model name, feature flags) of the first CPU; ("unknown", empty) where there is no cpuinfo."""
    model, flags = "unknown", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, flags


def onednn_allows_amx(max_isa: str | None) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA leaves AMX to oneDNN: unset, ALL/DEFAULT, or an ISA named *AMX*."""
    if not max_isa:
        return True
    max_isa = max_isa.strip().upper()
    return max_isa in ("ALL", "DEFAULT") or "AMX" in max_isa


def cpu_precision(flags, max_isa: str | None = None) -> tuple[str, str]:
    """(policy, reason) for auto on CPUs: bf16 pays only where matrix units (AMX) do the matmuls."""
    flags = set(flags)
    if AMX_FLAGS <= flags:
        if not onednn_allows_amx(max_isa):
            return "float32", (f"CPU has AMX (amx_bf16) but ONEDNN_MAX_CPU_ISA={max_isa} hides it "
                               "from oneDNN: bf16 would be slower than float32")
        return "mixed_bfloat16", "CPU has AMX (amx_bf16): bf16 matmuls run on its matrix units"
    if "avx512_bf16" in flags:
        return "float32", "CPU has avx512_bf16 but no AMX: bf16 would be slower than float32"
    return "float32", "CPU has no bf16 matrix units (no amx_bf16)"


def resolve_precision(name: str, strategy: tf.distribute.Strategy, cpu_flags=None) -> str:
    """auto: mixed_float16 on GPUs of compute capability 7.0 or more, bfloat16 on TPU, on CPUs what
    cpu_precision says; an explicit name is kept. `cpu_flags` stands in for the CPU's (tests)."""
    if name != "auto":
        return name
    if isinstance(strategy, tf.distribute.TPUStrategy):
        policy, reason = "mixed_bfloat16", "TPU"
    elif gpus := tf.config.list_physical_devices("GPU"):
        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0))
                        for g in gpus]
        if all(c and tuple(c) >= (7, 0) for c in capabilities):
            policy, reason = "mixed_float16", "GPUs of compute capability 7.0 or more"
        else:
            policy, reason = "float32", f"a GPU below compute capability 7.0 ({capabilities})"
    else:
        model, flags = cpu_info()
        policy, reason = cpu_precision(flags if cpu_flags is None else cpu_flags,
                                       os.environ.get("ONEDNN_MAX_CPU_ISA"))
        reason = f"{reason} ({model})"
    logging.info("--mixed_precision=auto chose %s: %s.", policy, reason)
    return policy


def computes_on_cpu(strategy: tf.distribute.Strategy) -> bool:
    """Whether the replicas run on CPUs, where some kernels are worth replacing (see matmul_conv)."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False
    return not tf.config.list_logical_devices("GPU")


def check_combination(precision: str, jit_compile: bool, strategy: tf.distribute.Strategy):
    """Refuse combinations Keras is known to crash on, before any work is done."""
    if (precision == "mixed_float16" and jit_compile and strategy.num_replicas_in_sync > 1):
        raise UserError(
            "--jit_compile with mixed_float16 under a multi-replica strategy is a known Keras crash; "
            "drop --jit_compile or use --mixed_precision=mixed_bfloat16 or float32. "
            "Received: jit_compile=True")
