"""GPTQ: second-order post-training quantization, one transformer block at a time."""

from compress import hookimpl
from compress_gptq.method import GPTQ


@hookimpl
def compress_register_methods(register):
    register(GPTQ)
