"""What a job prints: its own lines once each, progress per phase, no foreign warning floods.

`quiet()` runs wherever our code runs (the driver, each Ray Train worker, each scoring actor):
it filters the warnings that libraries raise about their own internals, which a user can do
nothing about, and sets the environment that keeps Ray's output to one copy of each line.
"""

from __future__ import annotations

import os
import warnings

# (message regex, category): raised inside libraries, about libraries, on every step or call.
FOREIGN_WARNINGS: list[tuple[str, type[Warning]]] = [
    # DeepSpeed's ZeRO gathers call a torch.distributed function torch 2.13 deprecates.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", FutureWarning),
    # transformers asks peft / DeepSpeed for a renamed attribute.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # Ray Data hands read-only Arrow buffers to torch.from_numpy; we never write to them.
    (r"The given NumPy array is not writable", UserWarning),
    # Ray Data's own executor options, renamed in Ray 2.60.
    (r"`ExecutionOptions\.exclude_resources` is deprecated", DeprecationWarning),
]

ENVIRONMENT = {
    # No phoning home from a closed network.
    "RAY_USAGE_STATS_ENABLED": "0",
    # No tokenizer thread pools fighting Ray workers for the cores.
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train V2 tees every worker `print` into a logger that writes to stderr as well as
    # stdout, so the driver showed each worker line twice. Ray propagates this to the workers.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Where stdout is not a terminal (CI, `ray job logs`), Ray Data logs its progress as text
    # every 10 s by default: once a minute is enough to show that a long phase moves.
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60",
}


def quiet() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for message, category in FOREIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def log(message: str) -> None:
    """One line of a job's own output, flushed at once so it interleaves with Ray's in order."""
    print(f"[shoprank] {message}", flush=True)


quiet()
