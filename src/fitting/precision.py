"""Numeric precision of the conv base: pick and apply the Keras dtype policy (`train.precision`).

`auto` picks `mixed_bfloat16` on CPUs with native bfloat16 math (AMX or AVX-512 BF16),
`mixed_float16` on GPUs with tensor cores (compute capability 7.0 or newer), `float32`
otherwise. Under a mixed policy, variables stay float32 and the classifier's output layer
computes in float32; cached features are stored as float32 whatever the policy.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def gpu_has_tensor_cores() -> bool:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= (7, 0):
            return True
    return False


def resolve(choice: str) -> str:
    """The dtype policy `choice` stands for on this machine."""
    if choice != "auto":
        return choice
    if gpu_has_tensor_cores():
        return "mixed_float16"
    if cpu_flags() & BF16_CPU_FLAGS:
        return "mixed_bfloat16"
    return "float32"


def use_xla(choice: str | bool) -> bool:
    """Whether to compile training steps with XLA (`train.jit_compile`). `auto`: on a GPU yes;
    on a CPU no (`benchmarks/xla.py` measured a float32 fine-tune epoch between 1.0x and 1.36x
    with XLA on a 2-core CPU, and a bfloat16 one between 0.5x and 0.8x)."""
    if choice != "auto":
        return bool(choice)
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def use(choice: str) -> str:
    """Set Keras' global dtype policy for the models built next; return and log it."""
    import keras

    policy = resolve(choice)
    keras.mixed_precision.set_global_policy(policy)
    log.info("precision: %s (train.precision=%s)", policy, choice)
    return policy
