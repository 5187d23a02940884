"""Round-to-nearest weight quantization, the baseline every quantizer is compared with."""

from compress import hookimpl
from compress_rtn.method import RoundToNearest, rtn_candidates

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(RoundToNearest)


@hookimpl
def compress_layer_candidates(name, module, request):
    return rtn_candidates(name, module, request)
