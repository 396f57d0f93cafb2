"""`train.precision: auto`: bfloat16 compute only where the hardware does bfloat16 natively.

Mixed bfloat16 made training much faster on CPUs with AMX or AVX512-BF16 and on GPUs, and slower on CPUs without
them, where every bfloat16 product is emulated (BENCHMARKS.md). So `auto` picks mixed_bfloat16 when TensorFlow
sees a GPU or the CPU reports `amx_bf16` or `avx512_bf16` (Linux's /proc/cpuinfo flags), float32 otherwise.

On a CPU, the width of the conv layers matters as much: oneDNN's BN and conv kernels run channel counts that are
multiples of 16 in whole vector blocks, and others on a slow path. mnist_fast's old 12/24/48 net trained 3x
*slower* in bfloat16 than in float32 on an AMX CPU (68 against 20 ms a step), while the 16/32/48 net is 1.5x
faster in bfloat16 (BENCHMARKS.md, "Performance round 3"). So on a CPU `auto` keeps float32 for a net with a
conv width that is not a multiple of 16.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_BF16_WIDTH = 16  # conv widths (channels) that oneDNN's bfloat16 kernels run at full speed are multiples of this


def cpu_flags(cpuinfo: str | None = None) -> set:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there or says none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")[:1 << 20]
        except OSError:
            return set()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_precision(setting: str, *, widths=(), flags: set | None = None, gpus: int | None = None) -> tuple[str, str]:
    """(the precision to train in, why) for a `train.precision` setting; `widths`: the net's conv filter counts."""
    if setting != "auto":
        return setting, "as configured"
    if gpus is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        return "mixed_bfloat16", f"auto: {gpus} GPU(s)"
    native = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    odd = sorted({w for w in widths if w % CPU_BF16_WIDTH})
    if native and odd:
        return "float32", (f"auto: the CPU has {', '.join(native)}, but conv widths {', '.join(map(str, odd))} are not "
                           f"multiples of {CPU_BF16_WIDTH}, where bfloat16 measured slower than float32")
    if native:
        return "mixed_bfloat16", f"auto: the CPU has {', '.join(native)}"
    return "float32", "auto: no native bfloat16 on this CPU (no amx_bf16, no avx512_bf16) and no GPU"
