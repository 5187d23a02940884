"""GPTQ: second-order post-training quantization, one transformer block at a time."""

from compress import hookimpl
from compress_gptq.candidates import gptq_candidates
from compress_gptq.method import GPTQ

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(GPTQ)


@hookimpl
def compress_layer_candidates(name, module, request):
    return gptq_candidates(name, module, request)
