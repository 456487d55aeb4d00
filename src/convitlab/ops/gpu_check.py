"""What `make check-gpu` prints first: each GPU Paddle sees, its compute capability, the NVIDIA
driver and the CUDA Paddle was built with; or, with no GPU visible, one line saying why and what
the GPU build needs (`python -m convitlab.ops.gpu_check`, exit status 1 then)."""
import re
import subprocess
import sys

# Paddle's CUDA 12.6 wheels (the Makefile's default PADDLE_GPU_INDEX) need this driver or newer
# (PaddlePaddle's installation pages for its cuda12.6 images: ">= 550.54.14"); an older one makes
# Paddle see no GPU at all, which is otherwise hard to tell from a missing one.
MIN_DRIVER = (550, 54)
MIN_DRIVER_TEXT = "NVIDIA driver >= 550.54"


def driver_version():
    """The NVIDIA driver's version ("550.54.14"), from nvidia-smi or the kernel module; None
    where neither answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", f.read())
        return found.group(1) if found else None
    except OSError:
        return None


def version_tuple(version):
    """(major, minor) of "550.54.14"; None for anything else."""
    found = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return (int(found.group(1)), int(found.group(2))) if found else None


def report(paddle, driver):
    """The lines to print and whether a GPU is usable: one line per GPU (name, compute capability,
    driver, Paddle's CUDA and version), or a single line saying why none is."""
    cuda = paddle.version.cuda() if paddle.is_compiled_with_cuda() else None
    driver_text = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found (nvidia-smi, /proc/driver/nvidia)"
    count = 0
    if cuda:
        try:
            count = paddle.device.cuda.device_count()
        except Exception:  # a driver too old for this CUDA makes Paddle fail here, not return 0
            count = 0
    if count == 0:
        why = (f"Paddle {paddle.__version__} is the CPU build" if not cuda
               else f"Paddle {paddle.__version__} (CUDA {cuda}) sees no GPU")
        too_old = version_tuple(driver) is not None and version_tuple(driver) < MIN_DRIVER
        return [f"no GPU visible: {why}; {driver_text}{' (too old)' if too_old else ''}: the cu126 wheels need "
                f"{MIN_DRIVER_TEXT}; install the GPU build (make setup EXTRAS=gpu,cluster,dev) and check "
                f"nvidia-smi"], False
    lines = []
    for index in range(count):
        major, minor = tuple(paddle.device.cuda.get_device_capability(index))[:2]
        lines.append(f"GPU {index}: {paddle.device.cuda.get_device_name(index)}, compute capability {major}.{minor}, "
                     f"{driver_text}, Paddle {paddle.__version__} built with CUDA {cuda}")
    return lines, True


def main():
    from convitlab.ops import runtime
    runtime.setup()
    import paddle
    lines, usable = report(paddle, driver_version())
    print("\n".join(lines), file=sys.stdout if usable else sys.stderr, flush=True)
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
